//! The JSON documents of an image: manifests, indexes and configs (OCI and Docker v2 flavours).
//!
//! These are parsed with our own tolerant structs rather than oci-spec's strict ones: real-world
//! configs carry `null`s and Docker-only fields, and all we need is a handful of fields.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ImageConfig;

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub(crate) const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub(crate) const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub(crate) const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// Manifest media types we ask registries for.
pub(crate) const ACCEPTED_MANIFESTS: &[&str] =
    &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// Largest manifest/index/config we are willing to parse (they are small JSON documents; this
/// keeps a hostile registry or archive from making us buffer gigabytes).
pub(crate) const MAX_JSON_SIZE: u64 = 8 << 20;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Descriptor {
    pub fn size(&self) -> Option<u64> {
        u64::try_from(self.size).ok().filter(|s| *s > 0)
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// Either kind of manifest document; told apart by content since `mediaType` is optional.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnyManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Manifest {
    pub schema_version: i64,
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug)]
pub(crate) enum Parsed {
    Manifest(Manifest),
    Index(Vec<Descriptor>),
}

/// Parses a manifest or index, rejecting schema 1 and anything that is not an image.
pub(crate) fn parse_manifest(bytes: &[u8]) -> Result<Parsed, String> {
    let any: AnyManifest =
        serde_json::from_slice(bytes).map_err(|e| format!("malformed manifest JSON: {e}"))?;
    if let Some(v) = any.schema_version {
        if v != 2 {
            return Err(format!(
                "unsupported manifest schema version {v} (only schema 2 / OCI images are supported)"
            ));
        }
    }
    if let Some(mt) = &any.media_type {
        if ![OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].contains(&mt.as_str()) {
            return Err(format!("unsupported manifest media type {mt:?}"));
        }
    }
    if let Some(manifests) = any.manifests {
        return Ok(Parsed::Index(manifests));
    }
    match (any.config, any.layers) {
        (Some(config), layers) => Ok(Parsed::Manifest(Manifest {
            schema_version: 2,
            media_type: any.media_type.unwrap_or_else(|| OCI_MANIFEST.to_string()),
            config,
            layers: layers.unwrap_or_default(),
        })),
        _ => Err("document is neither an image manifest nor an index".to_string()),
    }
}

/// Picks the linux/amd64 image out of an index. An index with a single entry and no platform
/// (as some single-arch OCI layouts are written) resolves to that entry.
pub(crate) fn select_platform(entries: &[Descriptor]) -> Option<&Descriptor> {
    let matching = entries.iter().find(|e| {
        e.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    matching.or_else(|| match entries {
        [only] if only.platform.is_none() => Some(only),
        _ => None,
    })
}

pub(crate) fn platforms_of(entries: &[Descriptor]) -> String {
    let names: Vec<String> = entries
        .iter()
        .filter_map(|e| e.platform.as_ref())
        .map(|p| match &p.variant {
            Some(v) => format!("{}/{}/{}", p.os, p.architecture, v),
            None => format!("{}/{}", p.os, p.architecture),
        })
        .collect();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    config: Option<ContainerConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Default, Deserialize)]
struct RootFs {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// What the store needs from an image config.
#[derive(Debug, Clone)]
pub(crate) struct ParsedConfig {
    pub config: ImageConfig,
    pub diff_ids: Vec<String>,
}

pub(crate) fn parse_config(bytes: &[u8]) -> Result<ParsedConfig, String> {
    let file: ConfigFile =
        serde_json::from_slice(bytes).map_err(|e| format!("malformed image config JSON: {e}"))?;
    if let Some(os) = &file.os {
        if os != "linux" {
            return Err(format!("image is for os {os:?}, not linux"));
        }
    }
    if let Some(arch) = &file.architecture {
        // Registries sometimes omit the index; refuse what we cannot run rather than fail
        // later with an exec format error.
        if !arch.is_empty() && arch != "amd64" {
            return Err(format!("image is for architecture {arch:?}, not amd64"));
        }
    }
    let rootfs = file
        .rootfs
        .ok_or_else(|| "image config has no rootfs".to_string())?;
    if rootfs.kind != "layers" {
        return Err(format!("unsupported rootfs type {:?}", rootfs.kind));
    }
    let c = file.config.unwrap_or_default();
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    Ok(ParsedConfig {
        config: ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: non_empty(c.working_dir),
            user: non_empty(c.user),
            labels: c.labels.unwrap_or_default(),
            exposed_ports: c.exposed_ports.unwrap_or_default().into_keys().collect(),
        },
        diff_ids: rootfs.diff_ids,
    })
}

/// Whether a layer media type is a tar (possibly compressed) we can unpack. The actual
/// compression is detected from the content's magic bytes.
pub(crate) fn is_layer_media_type(mt: &str) -> bool {
    matches!(
        mt,
        "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_config_with_nulls() {
        let cfg = br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":null,"Cmd":["sh"],
            "Env":["PATH=/bin"],"WorkingDir":"","User":"","Labels":null,"ExposedPorts":{"80/tcp":{}}},
            "rootfs":{"type":"layers","diff_ids":["sha256:aa"]}}"#;
        let p = parse_config(cfg).unwrap();
        assert_eq!(p.config.cmd, ["sh"]);
        assert!(p.config.entrypoint.is_empty());
        assert_eq!(p.config.working_dir, None);
        assert_eq!(p.config.user, None);
        assert_eq!(p.config.exposed_ports, ["80/tcp"]);
        assert_eq!(p.diff_ids, ["sha256:aa"]);
    }

    #[test]
    fn malformed_documents_are_errors() {
        assert!(parse_manifest(b"{").is_err());
        assert!(parse_manifest(b"[]").is_err());
        assert!(parse_manifest(br#"{"schemaVersion":1,"fsLayers":[]}"#).is_err());
        assert!(parse_manifest(br#"{"schemaVersion":2}"#).is_err());
        assert!(parse_manifest(br#"{"schemaVersion":2,"config":{"digest":1}}"#).is_err());
        assert!(parse_config(b"null").is_err());
        assert!(parse_config(br#"{"os":"windows","rootfs":{"type":"layers"}}"#).is_err());
    }

    #[test]
    fn selects_linux_amd64() {
        let idx = br#"{"schemaVersion":2,"manifests":[
            {"mediaType":"x","digest":"sha256:arm","size":1,"platform":{"os":"linux","architecture":"arm64"}},
            {"mediaType":"x","digest":"sha256:amd","size":1,"platform":{"os":"linux","architecture":"amd64"}}]}"#;
        let Parsed::Index(entries) = parse_manifest(idx).unwrap() else {
            panic!("not an index")
        };
        assert_eq!(select_platform(&entries).unwrap().digest, "sha256:amd");
        assert_eq!(platforms_of(&entries), "linux/arm64, linux/amd64");
        assert!(select_platform(&entries[..1]).is_none());
    }
}
