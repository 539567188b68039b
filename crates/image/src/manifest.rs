//! The JSON documents of an image: manifests, indexes and configs (OCI and Docker v2 flavours).
//!
//! These are parsed with our own tolerant structs rather than oci-spec's strict ones: real-world
//! configs carry `null`s and Docker-only fields, and all we need is a handful of fields.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::ImageConfig;

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub(crate) const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub(crate) const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub(crate) const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Config of a Wasm OCI artifact (the CNCF TAG-Runtime "wasm OCI artifact" layout runwasi and
/// containerd accept): `architecture: "wasm"`, `os: "wasip1"|"wasip2"`, `layerDigests`, an
/// optional `component` description, and no rootfs.
pub(crate) const WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";
/// A raw WebAssembly module or component as a layer (not a tar).
pub(crate) const WASM_LAYER: &str = "application/wasm";
/// The layer type wasm-to-oci used before the artifact layout settled on `application/wasm`.
pub(crate) const WASM_LAYER_LEGACY: &str = "application/vnd.wasm.content.layer.v1+wasm";
/// Name of the wasm file in the unpacked layer of an artifact with a single wasm layer.
pub(crate) const WASM_MODULE_FILE: &str = "module.wasm";

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

/// Whether `os`/`architecture` name a WebAssembly platform (`wasi/wasm`, `wasip1/wasm`,
/// `wasip2/wasm`).
pub(crate) fn is_wasm_platform(os: &str, architecture: &str) -> bool {
    architecture == "wasm" && matches!(os, "wasi" | "wasip1" | "wasip2")
}

/// Picks the linux/amd64 image out of an index, or failing that a WebAssembly one (`wasi/wasm`
/// and the like, which any runtime of ours can run through the wasm runtime). An index with a
/// single entry and no platform (as some single-arch OCI layouts are written) resolves to that
/// entry.
pub(crate) fn select_platform(entries: &[Descriptor]) -> Option<&Descriptor> {
    let platform = |pred: &dyn Fn(&Platform) -> bool| {
        entries
            .iter()
            .find(|e| e.platform.as_ref().is_some_and(pred))
    };
    let matching = platform(&|p| p.os == "linux" && p.architecture == "amd64")
        .or_else(|| platform(&|p| is_wasm_platform(&p.os, &p.architecture)));
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
    /// Per layer, the digest naming its unpacked directory: the config's diff_id for tar
    /// layers, [`wasm_layer_id`] for raw wasm layers.
    pub diff_ids: Vec<String>,
    /// Per layer: for a raw wasm layer, the file name it is unpacked as (at the layer's root).
    pub wasm_files: Vec<Option<String>>,
}

/// Parses an ordinary (OCI or Docker) image config.
pub(crate) fn parse_config(bytes: &[u8]) -> Result<ParsedConfig, String> {
    let file: ConfigFile =
        serde_json::from_slice(bytes).map_err(|e| format!("malformed image config JSON: {e}"))?;
    let os = file.os.unwrap_or_default();
    let arch = file.architecture.unwrap_or_default();
    if is_wasm_platform(&os, &arch) {
        // WebAssembly in an ordinary image (a tar layer holding the .wasm): the wasm runtime's.
    } else {
        if !os.is_empty() && os != "linux" {
            return Err(format!("image is for os {os:?}, not linux"));
        }
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
            os,
            architecture: arch,
        },
        wasm_files: vec![None; rootfs.diff_ids.len()],
        diff_ids: rootfs.diff_ids,
    })
}

/// The config of a Wasm OCI artifact (`application/vnd.wasm.config.v0+json`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WasmConfigFile {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    layer_digests: Option<Vec<String>>,
    #[serde(default)]
    component: Option<serde_json::Value>,
}

/// Parses the config of an image manifest, given the manifest's config and layer descriptors:
/// a Wasm OCI artifact config, or an ordinary image config (whose layers must then be tars).
pub(crate) fn parse_image_config(
    config: &Descriptor,
    layers: &[Descriptor],
    bytes: &[u8],
) -> Result<ParsedConfig, String> {
    if config.media_type == WASM_CONFIG {
        return parse_wasm_config(bytes, layers);
    }
    if let Some(l) = layers
        .iter()
        .find(|l| is_wasm_layer_media_type(&l.media_type))
    {
        return Err(format!(
            "layer {} is a raw wasm blob ({:?}) but the config is {:?}, not {WASM_CONFIG:?}",
            l.digest, l.media_type, config.media_type
        ));
    }
    parse_config(bytes)
}

/// A Wasm OCI artifact: every layer is a raw module or component. Each is unpacked as one
/// regular file at the root of its layer directory — `module.wasm` when there is one wasm
/// layer, `module-<i>.wasm` (i = 0, 1, … in manifest order) when there are several — and the
/// entrypoint is the first of them, so a runtime finds the wasm at `entrypoint[0]` exactly as
/// in an ordinary image whose tar layer holds it.
fn parse_wasm_config(bytes: &[u8], layers: &[Descriptor]) -> Result<ParsedConfig, String> {
    let file: WasmConfigFile =
        serde_json::from_slice(bytes).map_err(|e| format!("malformed wasm config JSON: {e}"))?;
    let arch = file.architecture.unwrap_or_else(|| "wasm".to_string());
    let os = file.os.unwrap_or_else(|| {
        if file.component.is_some() {
            "wasip2"
        } else {
            "wasip1"
        }
        .to_string()
    });
    if !is_wasm_platform(&os, &arch) {
        return Err(format!(
            "wasm config is for {os}/{arch}, not wasip1/wasm, wasip2/wasm or wasi/wasm"
        ));
    }
    if layers.is_empty() {
        return Err("wasm artifact has no layers".to_string());
    }
    if let Some(l) = layers
        .iter()
        .find(|l| !is_wasm_layer_media_type(&l.media_type))
    {
        return Err(format!(
            "wasm artifact layer {} has media type {:?}, not {WASM_LAYER:?}",
            l.digest, l.media_type
        ));
    }
    if let Some(listed) = file.layer_digests.filter(|d| !d.is_empty()) {
        let actual: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
        if listed != actual {
            return Err(format!(
                "wasm config lists layerDigests {listed:?} but the manifest's layers are {actual:?}"
            ));
        }
    }
    let names: Vec<String> = if layers.len() == 1 {
        vec![WASM_MODULE_FILE.to_string()]
    } else {
        (0..layers.len())
            .map(|i| format!("module-{i}.wasm"))
            .collect()
    };
    Ok(ParsedConfig {
        config: ImageConfig {
            entrypoint: vec![format!("/{}", names[0])],
            os,
            architecture: arch,
            ..ImageConfig::default()
        },
        diff_ids: layers
            .iter()
            .zip(&names)
            .map(|(l, name)| wasm_layer_id(&l.digest, name))
            .collect(),
        wasm_files: names.into_iter().map(Some).collect(),
    })
}

/// Names the unpacked directory of a raw wasm layer: a digest over the blob digest and the file
/// name it is unpacked as (a wasm blob has no tar, hence no diff_id of its own). Layers unpacked
/// the same way are shared between images like tar layers.
pub(crate) fn wasm_layer_id(blob_digest: &str, file: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"vmrun wasm layer\n");
    h.update(file.as_bytes());
    h.update(b"\n");
    h.update(blob_digest.as_bytes());
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Whether a layer media type is a raw WebAssembly blob.
pub(crate) fn is_wasm_layer_media_type(mt: &str) -> bool {
    mt == WASM_LAYER || mt == WASM_LAYER_LEGACY
}

/// Whether a layer media type is one we can unpack: a tar (possibly compressed; the actual
/// compression is detected from the content's magic bytes) or a raw wasm blob.
pub(crate) fn is_layer_media_type(mt: &str) -> bool {
    is_wasm_layer_media_type(mt) || is_tar_media_type(mt)
}

fn is_tar_media_type(mt: &str) -> bool {
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

    fn desc(media_type: &str, digest: &str) -> Descriptor {
        Descriptor {
            media_type: media_type.to_string(),
            digest: digest.to_string(),
            size: 1,
            ..Descriptor::default()
        }
    }

    #[test]
    fn wasm_layer_media_types_are_layers() {
        assert!(is_layer_media_type(WASM_LAYER));
        assert!(is_layer_media_type(WASM_LAYER_LEGACY));
        assert!(is_layer_media_type(OCI_LAYER_GZIP));
        assert!(is_wasm_layer_media_type("application/wasm"));
        assert!(!is_wasm_layer_media_type(OCI_LAYER_TAR));
        assert!(!is_layer_media_type(
            "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
        ));
    }

    #[test]
    fn wasm_artifact_config() {
        let layer = format!("sha256:{}", "a".repeat(64));
        let cfg = format!(
            r#"{{"architecture":"wasm","os":"wasip2","layerDigests":["{layer}"],
                "component":{{"exports":["wasi:cli/run@0.2.0"]}}}}"#
        );
        let config = desc(WASM_CONFIG, "sha256:c");
        let layers = [desc(WASM_LAYER, &layer)];
        let p = parse_image_config(&config, &layers, cfg.as_bytes()).unwrap();
        assert_eq!(p.config.entrypoint, ["/module.wasm"]);
        assert!(p.config.cmd.is_empty() && p.config.env.is_empty());
        assert_eq!(
            (p.config.os.as_str(), p.config.architecture.as_str()),
            ("wasip2", "wasm")
        );
        assert_eq!(p.wasm_files, [Some("module.wasm".to_string())]);
        assert_eq!(p.diff_ids, [wasm_layer_id(&layer, "module.wasm")]);
        assert!(crate::store::sha256_hex(&p.diff_ids[0]).is_some());

        // Several layers: one file each, the entrypoint the first.
        let two = [desc(WASM_LAYER, &layer), desc(WASM_LAYER, &layer)];
        let p = parse_image_config(&config, &two, br#"{"os":"wasip1"}"#).unwrap();
        assert_eq!(p.config.entrypoint, ["/module-0.wasm"]);
        assert_ne!(p.diff_ids[0], p.diff_ids[1]);

        // Refusals: a tar layer in an artifact, layerDigests that disagree, a foreign platform,
        // and a raw wasm layer under an ordinary image config.
        let tar = [desc(OCI_LAYER_TAR, &layer)];
        let err = parse_image_config(&config, &tar, b"{}").unwrap_err();
        assert!(err.contains("not \"application/wasm\""), "{err}");
        let other = format!(r#"{{"layerDigests":["sha256:{}"]}}"#, "b".repeat(64));
        assert!(parse_image_config(&config, &layers, other.as_bytes()).is_err());
        let linux = br#"{"architecture":"amd64","os":"linux"}"#;
        assert!(parse_image_config(&config, &layers, linux).is_err());
        assert!(parse_image_config(&config, &[], b"{}").is_err());
        let oci = desc(OCI_CONFIG, "sha256:c");
        let err = parse_image_config(&oci, &layers, b"{}").unwrap_err();
        assert!(err.contains("raw wasm blob"), "{err}");
    }

    #[test]
    fn ordinary_wasm_images_and_platforms() {
        let cfg = br#"{"architecture":"wasm","os":"wasip1","config":{"Entrypoint":["/app.wasm"]},
            "rootfs":{"type":"layers","diff_ids":["sha256:aa"]}}"#;
        let p = parse_config(cfg).unwrap();
        assert_eq!(p.config.entrypoint, ["/app.wasm"]);
        assert_eq!(p.config.os, "wasip1");
        assert_eq!(p.wasm_files, [None]);
        assert!(parse_config(
            br#"{"architecture":"wasm","os":"linux","rootfs":{"type":"layers"}}"#
        )
        .is_err());
        let idx = br#"{"schemaVersion":2,"manifests":[
            {"mediaType":"x","digest":"sha256:arm","size":1,"platform":{"os":"linux","architecture":"arm64"}},
            {"mediaType":"x","digest":"sha256:wasm","size":1,"platform":{"os":"wasi","architecture":"wasm"}}]}"#;
        let Parsed::Index(entries) = parse_manifest(idx).unwrap() else {
            panic!("not an index")
        };
        assert_eq!(select_platform(&entries).unwrap().digest, "sha256:wasm");
    }
}
