//! Test images built from scratch (no internet): layer tars, configs, manifests, and ways to
//! ship them — pushed to a [`Registry`], or written as an OCI layout, an oci-archive or a
//! `docker save` tar.
//!
//! Everything is deterministic (fixed mtimes and owners, gzip without timestamps), so building
//! the same image twice yields the same digests — tests rely on that for layer sharing.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use anyhow::Context;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::registry::Registry;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// `PATH` of the test images (Docker's default).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const MTIME: u64 = 1_700_000_000;

/// Applets linked in the busybox image (only those the host's busybox actually has).
const APPLETS: &[&str] = &[
    "sh",
    "ash",
    "echo",
    "cat",
    "ls",
    "sleep",
    "id",
    "hostname",
    "ps",
    "nc",
    "wget",
    "httpd",
    "mkdir",
    "touch",
    "rm",
    "head",
    "tail",
    "grep",
    "env",
    "true",
    "false",
    "kill",
    "top",
    "dd",
    "yes",
    "wc",
    "uname",
    "mount",
    "umount",
    "sed",
    "printf",
    "seq",
    "date",
    "tr",
    "cut",
    "sort",
    "test",
    "[",
    "[[",
    "cp",
    "mv",
    "ln",
    "chmod",
    "chown",
    "pwd",
    "whoami",
    "stat",
    "find",
    "xargs",
    "awk",
    "tee",
    "ip",
    "ifconfig",
    "ping",
    "nslookup",
    "df",
    "du",
    "free",
    "uptime",
    "pidof",
    "pgrep",
    "pkill",
    "basename",
    "dirname",
    "readlink",
    "realpath",
    "md5sum",
    "sha256sum",
    "tar",
    "gzip",
    "gunzip",
    "sync",
    "mktemp",
    "base64",
    "nproc",
    "timeout",
    "which",
    "diff",
    "usleep",
    "netstat",
    "hexdump",
    "od",
    "expr",
    "mkfifo",
    "rmdir",
    "cmp",
    "sh",
    "vi",
    "less",
    "more",
    "init",
    "chroot",
    "nohup",
    "setsid",
    "stty",
    "tty",
    "ulimit",
];

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// One entry of a test layer. Names are written into the tar header verbatim (no validation),
/// so malicious layers (`../x`, `/abs`, symlink tricks) can be built too.
#[derive(Debug, Clone)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    /// A file owned by `uid:gid` with extended attributes (written as PAX `SCHILY.xattr.*`).
    FileWith {
        path: String,
        mode: u32,
        uid: u64,
        gid: u64,
        xattrs: Vec<(String, Vec<u8>)>,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    Hardlink {
        path: String,
        target: String,
    },
}

impl Entry {
    /// Its path in the layer.
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::FileWith { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::Hardlink { path, .. } => path,
        }
    }
    pub fn dir(path: &str) -> Self {
        Entry::Dir {
            path: path.into(),
            mode: 0o755,
        }
    }
    pub fn file(path: &str, data: &[u8]) -> Self {
        Entry::File {
            path: path.into(),
            mode: 0o644,
            data: data.to_vec(),
        }
    }
    pub fn symlink(path: &str, target: &str) -> Self {
        Entry::Symlink {
            path: path.into(),
            target: target.into(),
        }
    }
    pub fn hardlink(path: &str, target: &str) -> Self {
        Entry::Hardlink {
            path: path.into(),
            target: target.into(),
        }
    }
    /// A whiteout hiding `path` of lower layers.
    pub fn whiteout(path: &str) -> Self {
        let (dir, name) = path.rsplit_once('/').map_or(("", path), |(d, n)| (d, n));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        Entry::file(&wh, b"")
    }
    /// Marks directory `dir` opaque (hides everything below it in lower layers).
    pub fn opaque(dir: &str) -> Self {
        Entry::file(&format!("{dir}/.wh..wh..opq"), b"")
    }
}

fn header(kind: tar::EntryType, name: &str, mode: u32, size: u64) -> anyhow::Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h.set_size(size);
    let field = &mut h.as_old_mut().name;
    anyhow::ensure!(name.len() < field.len(), "test entry name too long: {name}");
    field[..name.len()].copy_from_slice(name.as_bytes());
    Ok(h)
}

fn set_link(h: &mut tar::Header, target: &str) -> anyhow::Result<()> {
    let field = &mut h.as_old_mut().linkname;
    anyhow::ensure!(
        target.len() < field.len(),
        "test link target too long: {target}"
    );
    field[..target.len()].copy_from_slice(target.as_bytes());
    Ok(())
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    // "<len> <key>=<value>\n" where <len> counts the whole record including its own digits.
    let rest = key.len() + value.len() + 3;
    let mut len = rest + rest.to_string().len();
    if len.to_string().len() + rest != len {
        len = rest + len.to_string().len();
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

/// An uncompressed layer tar of `entries`, in order.
pub fn layer_tar(entries: &[Entry]) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Entry::Dir { path, mode } => {
                let mut h = header(tar::EntryType::Directory, path, *mode, 0)?;
                h.set_cksum();
                b.append(&h, &[][..])?;
            }
            Entry::File { path, mode, data } => {
                let mut h = header(tar::EntryType::Regular, path, *mode, data.len() as u64)?;
                h.set_cksum();
                b.append(&h, &data[..])?;
            }
            Entry::FileWith {
                path,
                mode,
                uid,
                gid,
                xattrs,
                data,
            } => {
                let mut pax = Vec::new();
                for (k, v) in xattrs {
                    pax.extend(pax_record(&format!("SCHILY.xattr.{k}"), v));
                }
                let mut ph = header(
                    tar::EntryType::XHeader,
                    "PaxHeader",
                    0o644,
                    pax.len() as u64,
                )?;
                ph.set_cksum();
                b.append(&ph, &pax[..])?;
                let mut h = header(tar::EntryType::Regular, path, *mode, data.len() as u64)?;
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_cksum();
                b.append(&h, &data[..])?;
            }
            Entry::Symlink { path, target } => {
                let mut h = header(tar::EntryType::Symlink, path, 0o777, 0)?;
                set_link(&mut h, target)?;
                h.set_cksum();
                b.append(&h, &[][..])?;
            }
            Entry::Hardlink { path, target } => {
                let mut h = header(tar::EntryType::Link, path, 0o644, 0)?;
                set_link(&mut h, target)?;
                h.set_cksum();
                b.append(&h, &[][..])?;
            }
        }
    }
    Ok(b.into_inner()?)
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    pub fn compress(self, tar: &[u8]) -> anyhow::Result<Vec<u8>> {
        match self {
            Compression::None => Ok(tar.to_vec()),
            Compression::Gzip => {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                enc.write_all(tar)?;
                Ok(enc.finish()?)
            }
            // The zstd CLI (installed alongside zstd's library on Debian) keeps this crate's
            // dependency list as it is.
            Compression::Zstd => {
                let dir = tempfile::tempdir()?;
                let input = dir.path().join("layer.tar");
                std::fs::write(&input, tar)?;
                let out = Command::new("zstd")
                    .args(["-q", "-c", "-3"])
                    .arg(&input)
                    .output()
                    .context("running zstd (apt-get install zstd)")?;
                anyhow::ensure!(
                    out.status.success(),
                    "zstd failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                Ok(out.stdout)
            }
        }
    }
}

/// A layer as stored in a registry.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Uncompressed tar (what `docker save` ships and what the diff_id hashes).
    pub tar: Vec<u8>,
    /// The blob: `tar`, compressed.
    pub blob: Vec<u8>,
    pub media_type: String,
    pub digest: String,
    pub diff_id: String,
}

impl Layer {
    pub fn new(tar: Vec<u8>, compression: Compression) -> anyhow::Result<Self> {
        let blob = compression.compress(&tar)?;
        Ok(Layer {
            digest: sha256(&blob),
            diff_id: sha256(&tar),
            media_type: compression.media_type().to_string(),
            blob,
            tar,
        })
    }
}

/// What a test image looks like.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub layers: Vec<Layer>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Docker v2 manifest/config media types instead of OCI ones.
    pub docker_media_types: bool,
}

impl ImageSpec {
    pub fn new(layers: Vec<Layer>) -> Self {
        ImageSpec {
            layers,
            entrypoint: None,
            cmd: vec!["sh".into()],
            env: vec![DEFAULT_PATH.into()],
            working_dir: None,
            user: None,
            labels: BTreeMap::new(),
            docker_media_types: false,
        }
    }

    pub fn build(&self) -> TestImage {
        let diff_ids: Vec<String> = self.layers.iter().map(|l| l.diff_id.clone()).collect();
        self.build_with_diff_ids(&diff_ids)
    }

    /// Builds the image with a config listing `diff_ids` instead of the layers' real ones (to
    /// test that a store verifies them).
    pub fn build_with_diff_ids(&self, diff_ids: &[String]) -> TestImage {
        let mut config = json!({
            "Cmd": self.cmd,
            "Env": self.env,
        });
        if let Some(ep) = &self.entrypoint {
            config["Entrypoint"] = json!(ep);
        }
        if let Some(wd) = &self.working_dir {
            config["WorkingDir"] = json!(wd);
        }
        if let Some(u) = &self.user {
            config["User"] = json!(u);
        }
        if !self.labels.is_empty() {
            config["Labels"] = json!(self.labels);
        }
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "created": "2023-11-14T22:13:20Z",
            "config": config,
            "rootfs": {
                "type": "layers",
                "diff_ids": diff_ids,
            },
        });
        let config = serde_json::to_vec(&config).expect("JSON values always serialize");
        let (manifest_type, config_type) = if self.docker_media_types {
            (DOCKER_MANIFEST, DOCKER_CONFIG)
        } else {
            (OCI_MANIFEST, OCI_CONFIG)
        };
        let layer_type = |l: &Layer| {
            if self.docker_media_types {
                match l.media_type.as_str() {
                    "application/vnd.oci.image.layer.v1.tar+gzip" => {
                        "application/vnd.docker.image.rootfs.diff.tar.gzip".to_string()
                    }
                    other => other.to_string(),
                }
            } else {
                l.media_type.clone()
            }
        };
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": { "mediaType": config_type, "digest": sha256(&config), "size": config.len() },
            "layers": self.layers.iter().map(|l| json!({
                "mediaType": layer_type(l), "digest": l.digest, "size": l.blob.len(),
            })).collect::<Vec<_>>(),
        });
        let manifest = serde_json::to_vec(&manifest).expect("JSON values always serialize");
        TestImage {
            layers: self.layers.clone(),
            config_digest: sha256(&config),
            manifest_digest: sha256(&manifest),
            manifest_media_type: manifest_type.to_string(),
            config,
            manifest,
        }
    }
}

/// A built image: the exact bytes a registry would serve.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub layers: Vec<Layer>,
    pub config: Vec<u8>,
    /// Image id.
    pub config_digest: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub manifest_media_type: String,
}

/// The busybox root filesystem: `bin/busybox` (the host's static one) plus relative applet
/// symlinks, `etc/passwd` (root, nobody), `etc/group`, and the usual empty directories.
pub fn busybox_entries() -> anyhow::Result<Vec<Entry>> {
    let busybox = std::fs::read("/usr/bin/busybox")
        .context("reading /usr/bin/busybox (apt-get install busybox-static)")?;
    let list = Command::new("/usr/bin/busybox")
        .arg("--list")
        .output()
        .context("busybox --list")?;
    let available: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let mut entries =
        vec![
        Entry::dir("bin"),
        Entry::dir("dev"),
        Entry::dir("etc"),
        Entry::dir("proc"),
        Entry::dir("root"),
        Entry::dir("sys"),
        Entry::Dir { path: "tmp".into(), mode: 0o1777 },
        Entry::dir("usr"),
        Entry::dir("usr/bin"),
        Entry::dir("var"),
        Entry::File { path: "bin/busybox".into(), mode: 0o755, data: busybox },
        Entry::file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        Entry::file("etc/group", b"root:x:0:\nnobody:x:65534:\n"),
        Entry::file("etc/hostname", b"busybox\n"),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for applet in APPLETS {
        if available.iter().any(|a| a == applet) && seen.insert(*applet) {
            entries.push(Entry::symlink(&format!("bin/{applet}"), "busybox"));
        }
    }
    Ok(entries)
}

/// The host's `file` with the shared libraries `ldd` says it needs, as image
/// entries at the same paths (parents included), for a glibc tool in a test
/// image.
fn host_program_entries(file: &str) -> anyhow::Result<Vec<Entry>> {
    let ldd = Command::new("ldd")
        .arg(file)
        .output()
        .with_context(|| format!("ldd {file}"))?;
    let mut paths = vec![file.to_string()];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line
            .split("=>")
            .last()
            .and_then(|r| r.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        paths.extend(path.map(str::to_string));
    }
    let mut dirs = std::collections::BTreeSet::new();
    let mut entries = Vec::new();
    for path in &paths {
        let rel = path.trim_start_matches('/');
        let mut parent = std::path::Path::new(rel).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.to_string_lossy().into_owned());
            parent = p.parent();
        }
        let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        entries.push(Entry::File {
            path: rel.into(),
            mode: 0o755,
            data,
        });
    }
    let mut out: Vec<Entry> = dirs.iter().map(|d| Entry::dir(d)).collect();
    out.extend(entries);
    Ok(out)
}

/// Busybox plus procps' `/usr/bin/free` (with its libraries, from the host):
/// busybox's own `free` asks sysinfo(2), procps's reads /proc/meminfo, as
/// the `free` of Debian or Ubuntu images does.
pub fn procps_image() -> anyhow::Result<TestImage> {
    let mut entries = busybox_entries()?;
    let known: std::collections::BTreeSet<String> =
        entries.iter().map(|e| e.path().to_string()).collect();
    entries.extend(
        host_program_entries("/usr/bin/free")?
            .into_iter()
            .filter(|e| !known.contains(e.path())),
    );
    let layer = Layer::new(layer_tar(&entries)?, Compression::Gzip)?;
    Ok(ImageSpec::new(vec![layer]).build())
}

/// The busybox image: one layer, `Cmd ["sh"]`, Docker's default `PATH`.
pub fn busybox_image(compression: Compression) -> anyhow::Result<TestImage> {
    let layer = Layer::new(layer_tar(&busybox_entries()?)?, compression)?;
    Ok(ImageSpec::new(vec![layer]).build())
}

/// Busybox with `Entrypoint ["/bin/echo", "entrypoint"]` and `Cmd ["cmd-default"]`: run as is
/// it prints `entrypoint cmd-default`; Kubernetes `command` replaces both, `args` only the Cmd.
pub fn entrypoint_image() -> anyhow::Result<TestImage> {
    let layer = Layer::new(layer_tar(&busybox_entries()?)?, Compression::Gzip)?;
    let mut spec = ImageSpec::new(vec![layer]);
    spec.entrypoint = Some(vec!["/bin/echo".into(), "entrypoint".into()]);
    spec.cmd = vec!["cmd-default".into()];
    spec.working_dir = Some("/tmp".into());
    Ok(spec.build())
}

fn client_for(addr: &str) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![addr.to_string()]),
        ..ClientConfig::default()
    })
}

/// Pushes `image` as `<addr>/<repo_tag>` over plain HTTP; returns the full reference.
pub async fn push_image(addr: &str, repo_tag: &str, image: &TestImage) -> anyhow::Result<String> {
    push_image_as(addr, repo_tag, image, RegistryAuth::Anonymous).await
}

/// [`push_image`] with credentials (for registries started with basic auth).
pub async fn push_image_as(
    addr: &str,
    repo_tag: &str,
    image: &TestImage,
    auth: RegistryAuth,
) -> anyhow::Result<String> {
    let reference: Reference = format!("{addr}/{repo_tag}")
        .parse()
        .with_context(|| format!("bad test reference {addr}/{repo_tag}"))?;
    let client = client_for(addr);
    // oci-client applies credentials per registry once `auth` has recorded them.
    client
        .auth(&reference, &auth, oci_client::RegistryOperation::Push)
        .await?;
    for layer in &image.layers {
        client
            .push_blob(&reference, layer.blob.clone(), &layer.digest)
            .await?;
    }
    client
        .push_blob(&reference, image.config.clone(), &image.config_digest)
        .await?;
    client
        .push_manifest_raw(
            &reference,
            image.manifest.clone(),
            image.manifest_media_type.parse()?,
        )
        .await
        .with_context(|| format!("pushing manifest of {reference}"))?;
    Ok(reference.whole())
}

/// Pushes an image index (`manifests` = (image, os, architecture)) whose images have been
/// pushed to the same repository already; returns the reference and the index digest.
pub async fn push_index(
    addr: &str,
    repo_tag: &str,
    manifests: &[(&TestImage, &str, &str)],
) -> anyhow::Result<(String, String)> {
    let reference: Reference = format!("{addr}/{repo_tag}").parse()?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests.iter().map(|(img, os, arch)| json!({
            "mediaType": img.manifest_media_type,
            "digest": img.manifest_digest,
            "size": img.manifest.len(),
            "platform": { "os": os, "architecture": arch },
        })).collect::<Vec<_>>(),
    });
    let index = serde_json::to_vec(&index)?;
    let client = client_for(addr);
    client
        .auth(
            &reference,
            &RegistryAuth::Anonymous,
            oci_client::RegistryOperation::Push,
        )
        .await?;
    client
        .push_manifest_raw(&reference, index.clone(), OCI_INDEX.parse()?)
        .await?;
    Ok((reference.whole(), sha256(&index)))
}

/// Pushes the busybox image (gzip layer) as `<registry>/<repo_tag>`.
pub async fn push_busybox(registry: &Registry, repo_tag: &str) -> anyhow::Result<String> {
    push_image(
        &registry.addr(),
        repo_tag,
        &busybox_image(Compression::Gzip)?,
    )
    .await
}

/// Pushes busybox with a zstd-compressed layer.
pub async fn push_busybox_zstd(registry: &Registry, repo_tag: &str) -> anyhow::Result<String> {
    push_image(
        &registry.addr(),
        repo_tag,
        &busybox_image(Compression::Zstd)?,
    )
    .await
}

/// Pushes [`entrypoint_image`].
pub async fn push_image_with_entrypoint(
    registry: &Registry,
    repo_tag: &str,
) -> anyhow::Result<String> {
    push_image(&registry.addr(), repo_tag, &entrypoint_image()?).await
}

/// Writes `image` as an OCI image layout directory; `ref_name` becomes the
/// `org.opencontainers.image.ref.name` annotation.
pub fn write_oci_layout(
    dir: &Path,
    image: &TestImage,
    ref_name: Option<&str>,
) -> anyhow::Result<()> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |digest: &str, data: &[u8]| {
        std::fs::write(blobs.join(digest.trim_start_matches("sha256:")), data)
    };
    for l in &image.layers {
        put(&l.digest, &l.blob)?;
    }
    put(&image.config_digest, &image.config)?;
    put(&image.manifest_digest, &image.manifest)?;
    let mut entry = json!({
        "mediaType": image.manifest_media_type,
        "digest": image.manifest_digest,
        "size": image.manifest.len(),
    });
    if let Some(name) = ref_name {
        entry["annotations"] = json!({ "org.opencontainers.image.ref.name": name });
    }
    let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry] });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(())
}

/// Writes `image` as an oci-archive: a tar of an OCI layout.
pub fn write_oci_archive(
    path: &Path,
    image: &TestImage,
    ref_name: Option<&str>,
) -> anyhow::Result<()> {
    let layout = tempfile::tempdir()?;
    write_oci_layout(layout.path(), image, ref_name)?;
    let mut b = tar::Builder::new(std::fs::File::create(path)?);
    b.append_dir_all(".", layout.path())?;
    b.into_inner()?.sync_all()?;
    Ok(())
}

/// Writes `image` the way `docker save` (before Docker 25) does: `manifest.json`, the config as
/// `<hex>.json`, each layer as an uncompressed `<diffid-hex>/layer.tar`.
pub fn write_docker_save(path: &Path, image: &TestImage, repo_tags: &[&str]) -> anyhow::Result<()> {
    let mut b = tar::Builder::new(std::fs::File::create(path)?);
    let mut add = |name: &str, data: &[u8]| -> anyhow::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(MTIME);
        b.append_data(&mut h, name, data)?;
        Ok(())
    };
    let config_name = format!("{}.json", image.config_digest.trim_start_matches("sha256:"));
    add(&config_name, &image.config)?;
    let mut layer_names = Vec::new();
    for l in &image.layers {
        let name = format!("{}/layer.tar", l.diff_id.trim_start_matches("sha256:"));
        add(&name, &l.tar)?;
        layer_names.push(name);
    }
    let manifest = json!([{ "Config": config_name, "RepoTags": repo_tags, "Layers": layer_names }]);
    add("manifest.json", &serde_json::to_vec(&manifest)?)?;
    b.into_inner()?.sync_all()?;
    Ok(())
}

/// An ordinary OCI image for the wasm runtime: one gzip tar layer holding `/app.wasm` (mode
/// 0755, the bytes `wasm`), config `Entrypoint ["/app.wasm"]`, no `Cmd` or `Env`, `os`
/// `wasip1`, `architecture` `wasm` (what `docker buildx --platform wasi/wasm` style builds and
/// runwasi's examples ship).
pub fn wasm_image(wasm: &[u8]) -> TestImage {
    let entries = [Entry::File {
        path: "app.wasm".into(),
        mode: 0o755,
        data: wasm.to_vec(),
    }];
    let tar = layer_tar(&entries).expect("a one-file layer with a short name always builds");
    let layer = Layer::new(tar, Compression::Gzip).expect("gzip into memory cannot fail");
    let mut spec = ImageSpec::new(vec![layer]);
    spec.entrypoint = Some(vec!["/app.wasm".into()]);
    spec.cmd = Vec::new();
    spec.env = Vec::new();
    let built = spec.build();
    // The builder writes linux/amd64; rewrite the platform and rebuild config and manifest.
    let mut config: serde_json::Value =
        serde_json::from_slice(&built.config).expect("the builder writes JSON");
    config["os"] = json!("wasip1");
    config["architecture"] = json!("wasm");
    let config = serde_json::to_vec(&config).expect("JSON values always serialize");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&built.manifest).expect("the builder writes JSON");
    manifest["config"]["digest"] = json!(sha256(&config));
    manifest["config"]["size"] = json!(config.len());
    let manifest = serde_json::to_vec(&manifest).expect("JSON values always serialize");
    TestImage {
        layers: built.layers,
        config_digest: sha256(&config),
        manifest_digest: sha256(&manifest),
        manifest_media_type: built.manifest_media_type,
        config,
        manifest,
    }
}

/// Pushes [`wasm_image`]`(wasm)` as `<registry>/<repo_tag>`; returns the full reference.
pub async fn push_wasm_image(
    registry: &Registry,
    repo_tag: &str,
    wasm: &[u8],
) -> anyhow::Result<String> {
    push_image(&registry.addr(), repo_tag, &wasm_image(wasm)).await
}
