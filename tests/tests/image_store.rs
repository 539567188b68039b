//! End-to-end tests of the image store against a local `docker-registry`. Needs root (layers
//! keep ownership, whiteouts are device nodes, opaque dirs use trusted.* xattrs).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

use vmrun_image::{
    ImageStore, LayerError, NoProgress, PullError, PullPolicy, PullProgress, RegistryConfig,
};
use vmrun_tests::fault_proxy::{Fault, FaultProxy};
use vmrun_tests::images::{
    self, busybox_entries, busybox_image, layer_tar, push_image, push_index, Compression, Entry,
    ImageSpec, Layer, TestImage,
};
use vmrun_tests::registry::Registry;

fn new_store() -> (tempfile::TempDir, ImageStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path().join("store"), RegistryConfig::default()).unwrap();
    (dir, store)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn hex(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

/// Nothing but what `keep` lists is stored: no blobs, layers, records or temporaries.
fn assert_store_holds(store: &ImageStore, blobs: &[&str], layers: &[&str]) {
    let mut want_blobs: Vec<String> = blobs.iter().map(|d| hex(d).to_string()).collect();
    want_blobs.sort();
    let mut want_layers: Vec<String> = layers.iter().map(|d| hex(d).to_string()).collect();
    want_layers.sort();
    assert_eq!(
        names(&store.root().join("blobs/sha256")),
        want_blobs,
        "blobs"
    );
    assert_eq!(
        names(&store.root().join("layers/sha256")),
        want_layers,
        "layers"
    );
    assert_eq!(
        names(&store.root().join("tmp")),
        Vec::<String>::new(),
        "tmp"
    );
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: both strings are NUL-terminated and live across the call; `buf` is writable for
    // the length passed.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| {
        buf.truncate(len as usize);
        buf
    })
}

#[derive(Default)]
struct Recorder {
    started: Mutex<Vec<String>>,
    finished: Mutex<Vec<String>>,
    bytes: Mutex<BTreeMap<String, u64>>,
}

impl PullProgress for Recorder {
    fn started(&self, digest: &str, _size: Option<u64>) {
        self.started.lock().unwrap().push(digest.to_string());
    }
    fn advanced(&self, digest: &str, bytes: u64) {
        *self
            .bytes
            .lock()
            .unwrap()
            .entry(digest.to_string())
            .or_default() += bytes;
    }
    fn finished(&self, digest: &str) {
        self.finished.lock().unwrap().push(digest.to_string());
    }
    fn message(&self, _msg: &str) {}
}

/// A busybox image plus one extra layer, so each test gets content no other test shares.
fn busybox_plus(extra: Vec<Entry>) -> TestImage {
    let base = Layer::new(
        layer_tar(&busybox_entries().unwrap()).unwrap(),
        Compression::Gzip,
    )
    .unwrap();
    let top = Layer::new(layer_tar(&extra).unwrap(), Compression::Gzip).unwrap();
    ImageSpec::new(vec![base, top]).build()
}

fn check_busybox_rootfs(layer: &Path) {
    let bb = std::fs::metadata(layer.join("bin/busybox")).unwrap();
    assert_eq!(
        bb.len(),
        std::fs::metadata("/usr/bin/busybox").unwrap().len()
    );
    assert_eq!(bb.permissions().mode() & 0o7777, 0o755);
    assert_eq!(bb.mtime(), 1_700_000_000, "mtime kept");
    assert_eq!(
        std::fs::read_link(layer.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert!(std::fs::read_to_string(layer.join("etc/passwd"))
        .unwrap()
        .contains("nobody:x:65534:65534"));
    let tmp = std::fs::metadata(layer.join("tmp")).unwrap();
    assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777);
    assert_eq!(tmp.mtime(), 1_700_000_000, "directory mtime kept");
}

#[tokio::test]
async fn pull_by_tag_then_by_digest() {
    let reference = vmrun_tests::shared_busybox().await.unwrap();
    let expected = busybox_image(Compression::Gzip).unwrap();
    let (_dir, store) = new_store();

    let image = store.pull(&reference, &NoProgress).await.unwrap();
    assert_eq!(image.id, expected.config_digest);
    assert_eq!(image.manifest_digest, expected.manifest_digest);
    assert_eq!(image.references, vec![reference.clone()]);
    assert_eq!(image.config.cmd, ["sh"]);
    assert_eq!(image.config.env, [images::DEFAULT_PATH]);
    assert!(image.size > 500_000, "size {}", image.size);
    assert_eq!(image.layers.len(), 1);
    assert_eq!(
        image.layers[0],
        store
            .root()
            .join("layers/sha256")
            .join(hex(&expected.layers[0].diff_id))
    );
    check_busybox_rootfs(&image.layers[0]);
    assert_store_holds(
        &store,
        &[
            &expected.config_digest,
            &expected.manifest_digest,
            &expected.layers[0].digest,
        ],
        &[&expected.layers[0].diff_id],
    );

    // By digest: same image, the digest reference is added.
    let repo = reference.trim_end_matches(":latest");
    let by_digest = format!("{repo}@{}", expected.manifest_digest);
    let again = store.pull(&by_digest, &NoProgress).await.unwrap();
    assert_eq!(again.id, image.id);
    assert_eq!(again.references, {
        let mut r = vec![reference.clone(), by_digest.clone()];
        r.sort();
        r
    });

    // Lookups: by reference, digest reference, full id, short id.
    for key in [
        &reference,
        &by_digest,
        &image.id,
        &hex(&image.id)[..12].to_string(),
    ] {
        assert_eq!(store.get(key).unwrap().unwrap().id, image.id, "get({key})");
    }
    assert!(store
        .get("docker.io/library/nothere:latest")
        .unwrap()
        .is_none());
    assert_eq!(store.list().unwrap().len(), 1);
}

/// Two layers: the upper one deletes a file (whiteout), replaces a directory
/// (opaque) and adds an owned setuid file with an xattr, a hardlink and a symlink.
async fn push_whiteout_image(tag: &str) -> String {
    let registry = vmrun_tests::shared_registry().await.unwrap();
    let lower = Layer::new(
        layer_tar(&[
            Entry::dir("a"),
            Entry::file("a/keep", b"keep"),
            Entry::file("a/gone", b"gone"),
            Entry::dir("o"),
            Entry::file("o/old", b"old"),
        ])
        .unwrap(),
        Compression::Gzip,
    )
    .unwrap();
    let upper = Layer::new(
        layer_tar(&[
            Entry::dir("a"),
            Entry::whiteout("a/gone"),
            Entry::dir("o"),
            Entry::opaque("o"),
            Entry::file("o/new", b"new"),
            Entry::FileWith {
                path: "owned".into(),
                mode: 0o4750,
                uid: 1000,
                gid: 2000,
                xattrs: vec![("user.vmrun".into(), b"hello".to_vec())],
                data: b"data".to_vec(),
            },
            Entry::hardlink("owned-link", "owned"),
            Entry::symlink("abs-link", "/etc/passwd"),
        ])
        .unwrap(),
        Compression::None,
    )
    .unwrap();
    let img = ImageSpec::new(vec![lower, upper]).build();
    push_image(&registry.addr(), tag, &img).await.unwrap()
}

#[tokio::test]
async fn whiteouts_opaque_dirs_and_metadata() {
    let reference = push_whiteout_image("test/whiteouts:v1").await;
    let (dir, store) = new_store();
    let image = store.pull(&reference, &NoProgress).await.unwrap();
    let (lo, up) = (&image.layers[0], &image.layers[1]);

    // Whiteout: a 0:0 character device named like the hidden file; no `.wh.` file remains.
    let wh = std::fs::symlink_metadata(up.join("a/gone")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert!(!up.join("a/.wh.gone").exists());
    // Opaque: xattr on the dir, marker file not materialized.
    assert_eq!(
        get_xattr(&up.join("o"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(!up.join("o/.wh..wh..opq").exists());
    assert!(get_xattr(&lo.join("o"), "trusted.overlay.opaque").is_none());
    // Ownership, setuid mode (restored after chown), xattrs, hardlinks, verbatim symlinks.
    let owned = std::fs::metadata(up.join("owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1000, 2000));
    assert_eq!(owned.permissions().mode() & 0o7777, 0o4750);
    assert_eq!(
        get_xattr(&up.join("owned"), "user.vmrun").as_deref(),
        Some(&b"hello"[..])
    );
    let link = std::fs::metadata(up.join("owned-link")).unwrap();
    assert_eq!((link.ino(), owned.nlink()), (owned.ino(), 2));
    assert_eq!(
        std::fs::read_link(up.join("abs-link")).unwrap(),
        Path::new("/etc/passwd")
    );

    // The real proof: overlayfs with these lowerdirs shows the merged image as intended.
    let merged = dir.path().join("merged");
    std::fs::create_dir(&merged).unwrap();
    let opts = format!("lowerdir={}:{}", up.display(), lo.display());
    assert_eq!(
        overlay_view(&merged, &opts),
        (true, false, false, true),
        "keep, gone, old, new"
    );
}

/// Runs `stat PATH` as nobody (65534:65534, no groups): its stderr if it failed.
fn stat_as_nobody(path: &Path) -> Option<String> {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new("/usr/bin/stat")
        .arg(path)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn setuid_programs_of_an_image_are_kept_but_out_of_host_users_reach() {
    if !nix::unistd::geteuid().is_root() {
        println!(
            "SKIPPED: setuid_programs_of_an_image_are_kept_but_out_of_host_users_reach needs root"
        );
        return;
    }
    let registry = vmrun_tests::shared_registry().await.unwrap();
    let shell = std::fs::read("/usr/bin/busybox").unwrap();
    let img = one_layer_image(&[Entry::File {
        path: "rootshell".into(),
        mode: 0o4755,
        data: shell,
    }]);
    let reference = push_image(&registry.addr(), "test/setuid:v1", &img)
        .await
        .unwrap();
    let (_dir, store) = new_store();
    // A store made before layers/ was private gets it private at open.
    std::fs::set_permissions(
        store.root().join("layers"),
        std::fs::Permissions::from_mode(0o711),
    )
    .unwrap();
    let store = ImageStore::open(store.root(), RegistryConfig::default()).unwrap();
    let image = store.pull(&reference, &NoProgress).await.unwrap();
    let program = image.layers[0].join("rootshell");
    let meta = std::fs::metadata(&program).unwrap();
    // Kept as the image says: a container may need it (sudo, ping).
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o7777),
        (0, 0o4755)
    );
    let layers = std::fs::metadata(store.root().join("layers")).unwrap();
    assert_eq!(layers.permissions().mode() & 0o7777, 0o700);
    // A host user who knows the diff_id (it is in the image config) cannot reach it.
    let err = stat_as_nobody(&program).expect("nobody reached a layer's setuid program");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(
        stat_as_nobody(store.root()).is_none(),
        "the store root stays traversable"
    );
}

/// Mounts a read-only overlay at `merged` and reports whether a/keep, a/gone,
/// o/old and o/new are visible.
fn overlay_view(merged: &Path, opts: &str) -> (bool, bool, bool, bool) {
    nix::mount::mount(
        Some("overlay"),
        merged,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(opts),
    )
    .unwrap_or_else(|e| panic!("overlay mount {opts}: {e}"));
    let seen = (
        merged.join("a/keep").exists(),
        merged.join("a/gone").exists(),
        merged.join("o/old").exists(),
        merged.join("o/new").exists(),
    );
    nix::mount::umount(merged).unwrap();
    seen
}

#[tokio::test]
async fn block_image_is_an_erofs_of_the_layers_that_overlays_the_same() {
    let reference = push_whiteout_image("test/whiteouts:block").await;
    let (dir, store) = new_store();
    let image = store.pull(&reference, &NoProgress).await.unwrap();
    let erofs = store.block_image(&image).unwrap();
    assert!(
        erofs.starts_with(store.root().join("block/sha256")),
        "{erofs:?}"
    );
    let built = std::fs::metadata(&erofs).unwrap().modified().unwrap();
    assert_eq!(store.block_image(&image).unwrap(), erofs, "cached path");
    assert_eq!(
        std::fs::metadata(&erofs).unwrap().modified().unwrap(),
        built,
        "the second call must not rebuild"
    );

    // What the guest does: mount the disk, overlay its numbered layers.
    let mnt = dir.path().join("erofs");
    std::fs::create_dir(&mnt).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "erofs", "-o", "loop,ro"])
        .arg(&erofs)
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(status.success(), "mount -t erofs {erofs:?}");
    let layers = mnt.join(vmrun_image::BLOCK_LAYERS_DIR);
    let owned = std::fs::metadata(layers.join("1/owned"));
    let owned_xattr = get_xattr(&layers.join("1/owned"), "user.vmrun");
    let merged = dir.path().join("merged");
    std::fs::create_dir(&merged).unwrap();
    let opts = format!(
        "lowerdir={}:{}",
        layers.join("1").display(),
        layers.join("0").display()
    );
    let seen = overlay_view(&merged, &opts);
    let umount = std::process::Command::new("umount")
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(umount.success());
    assert_eq!(seen, (true, false, false, true), "keep, gone, old, new");
    let owned = owned.unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1000, 2000));
    assert_eq!(owned.permissions().mode() & 0o7777, 0o4750);
    assert_eq!(owned_xattr.as_deref(), Some(&b"hello"[..]));

    // Removing the image removes its block image.
    store.remove(&reference).unwrap();
    assert!(!erofs.exists(), "block image left after rm");
}

#[tokio::test]
async fn shared_layer_is_unpacked_once() {
    let busybox = vmrun_tests::shared_busybox().await.unwrap();
    let entrypoint = vmrun_tests::shared_entrypoint_image().await.unwrap();
    let (_dir, store) = new_store();

    let first = store.pull(&busybox, &NoProgress).await.unwrap();
    let inode = std::fs::metadata(first.layers[0].join("bin/busybox"))
        .unwrap()
        .ino();
    let progress = Recorder::default();
    let second = store.pull(&entrypoint, &progress).await.unwrap();

    assert_ne!(first.id, second.id);
    assert_eq!(first.layers, second.layers, "same diff_id, same directory");
    assert_eq!(
        std::fs::metadata(second.layers[0].join("bin/busybox"))
            .unwrap()
            .ino(),
        inode,
        "layer not unpacked again"
    );
    assert!(
        progress.started.lock().unwrap().is_empty(),
        "layer not downloaded again"
    );
    assert_eq!(second.config.entrypoint, ["/bin/echo", "entrypoint"]);
    assert_eq!(second.config.cmd, ["cmd-default"]);
    assert_eq!(second.config.working_dir.as_deref(), Some("/tmp"));
    assert_eq!(names(&store.root().join("layers/sha256")).len(), 1);
}

#[tokio::test]
async fn zstd_layer() {
    let reference = vmrun_tests::shared_busybox_zstd().await.unwrap();
    let (_dir, store) = new_store();
    let progress = Recorder::default();
    let image = store.pull(&reference, &progress).await.unwrap();
    check_busybox_rootfs(&image.layers[0]);
    let expected = busybox_image(Compression::Zstd).unwrap();
    assert_eq!(
        *progress.started.lock().unwrap(),
        [expected.layers[0].digest.clone()]
    );
    assert_eq!(
        progress.bytes.lock().unwrap()[&expected.layers[0].digest],
        expected.layers[0].blob.len() as u64
    );
    assert_eq!(
        *progress.finished.lock().unwrap(),
        [expected.layers[0].digest.clone()]
    );
}

#[tokio::test]
async fn docker_v2_manifest_and_index_resolution() {
    let registry = vmrun_tests::shared_registry().await.unwrap();
    let addr = registry.addr();
    let mut spec = ImageSpec::new(busybox_image(Compression::Gzip).unwrap().layers);
    spec.docker_media_types = true;
    spec.labels.insert("flavour".into(), "docker".into());
    let docker = spec.build();
    // Something else for the arm64 slot of the index, so a wrong pick is detectable.
    let arm = busybox_plus(vec![Entry::file("arch", b"arm64")]);
    push_image(&addr, "test/multi:amd64", &docker)
        .await
        .unwrap();
    push_image(&addr, "test/multi:arm64", &arm).await.unwrap();
    let (reference, _) = push_index(
        &addr,
        "test/multi:latest",
        &[(&arm, "linux", "arm64"), (&docker, "linux", "amd64")],
    )
    .await
    .unwrap();
    let (only_arm, _) = push_index(&addr, "test/multi:armonly", &[(&arm, "linux", "arm64")])
        .await
        .unwrap();

    let (_dir, store) = new_store();
    let image = store.pull(&reference, &NoProgress).await.unwrap();
    assert_eq!(image.id, docker.config_digest);
    assert_eq!(image.manifest_digest, docker.manifest_digest);
    assert_eq!(image.config.labels["flavour"], "docker");

    let err = store
        .pull(&only_arm, &NoProgress)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!("pull {only_arm}: no linux/amd64 image in the index (has: linux/arm64)")
    );
}

#[tokio::test]
async fn import_oci_layout_oci_archive_and_docker_save() {
    let img = busybox_image(Compression::Gzip).unwrap();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    images::write_oci_layout(&layout, &img, Some("example.com/layout/busybox:1")).unwrap();
    let archive = work.path().join("busybox.oci.tar");
    images::write_oci_archive(&archive, &img, Some("example.com/archive/busybox:2")).unwrap();
    let save = work.path().join("busybox.docker.tar");
    images::write_docker_save(&save, &img, &["busybox:3", "me/busybox:latest"]).unwrap();

    let (_dir, store) = new_store();
    let cases: [(&Path, Vec<&str>); 3] = [
        (&layout, vec!["example.com/layout/busybox:1"]),
        (&archive, vec!["example.com/archive/busybox:2"]),
        (
            &save,
            vec!["docker.io/library/busybox:3", "docker.io/me/busybox:latest"],
        ),
    ];
    for (path, refs) in cases {
        let imported = store.import(path, &NoProgress).unwrap();
        assert_eq!(imported.len(), 1, "{}", path.display());
        let image = &imported[0];
        assert_eq!(image.id, img.config_digest, "{}", path.display());
        for r in refs {
            assert!(
                image.references.iter().any(|x| x == r),
                "{r} in {:?}",
                image.references
            );
            assert_eq!(store.get(r).unwrap().unwrap().id, img.config_digest);
        }
        assert_eq!(image.config.cmd, ["sh"]);
        check_busybox_rootfs(&image.layers[0]);
    }
    // Same diff_id everywhere: one unpacked layer; nothing left in tmp/ (the archives were
    // extracted there).
    assert_eq!(names(&store.root().join("layers/sha256")).len(), 1);
    assert!(names(&store.root().join("tmp")).is_empty());
    assert_eq!(store.list().unwrap().len(), 1);
    // An untagged layout import is addressable by id.
    let untagged = work.path().join("untagged");
    let other = busybox_plus(vec![Entry::file("x", b"untagged")]);
    images::write_oci_layout(&untagged, &other, Some("latest")).unwrap();
    let imported = store.import(&untagged, &NoProgress).unwrap();
    assert!(imported[0].references.is_empty());
    assert_eq!(
        store.get(&imported[0].id[7..19]).unwrap().unwrap().id,
        other.config_digest
    );
}

#[tokio::test]
async fn import_refuses_bad_files() {
    let work = tempfile::tempdir().unwrap();
    let (_dir, store) = new_store();

    let junk = work.path().join("junk");
    std::fs::write(&junk, b"this is not a tar archive at all, just bytes").unwrap();
    let err = store.import(&junk, &NoProgress).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("import {}:", junk.display())),
        "{err}"
    );

    let missing = work.path().join("missing.tar");
    let err = store.import(&missing, &NoProgress).unwrap_err().to_string();
    assert!(err.contains("No such file"), "{err}");

    // A layout whose layer blob was altered: digest mismatch, nothing kept.
    let img = busybox_plus(vec![Entry::file("f", b"original")]);
    let layout = work.path().join("layout");
    images::write_oci_layout(&layout, &img, Some("example.com/x:1")).unwrap();
    let blob = layout.join("blobs/sha256").join(hex(&img.layers[1].digest));
    let mut data = std::fs::read(&blob).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(&blob, data).unwrap();
    let err = store.import(&layout, &NoProgress).unwrap_err().to_string();
    assert!(
        err.contains(&img.layers[1].digest) && err.contains("refusing"),
        "{err}"
    );
    assert_store_holds(&store, &[], &[]);

    // A docker-save archive with broken manifest.json.
    let bad = work.path().join("bad-save.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&bad).unwrap());
    let mut h = tar::Header::new_ustar();
    h.set_size(3);
    h.set_mode(0o644);
    b.append_data(&mut h, "manifest.json", &b"[{,"[..]).unwrap();
    b.finish().unwrap();
    let err = store.import(&bad, &NoProgress).unwrap_err().to_string();
    assert!(err.contains("manifest.json"), "{err}");
    assert!(store.list().unwrap().is_empty());
}

#[tokio::test]
async fn rm_frees_unused_blobs_and_layers() {
    let busybox = vmrun_tests::shared_busybox().await.unwrap();
    let entrypoint = vmrun_tests::shared_entrypoint_image().await.unwrap();
    let (_dir, store) = new_store();
    let bb = store.pull(&busybox, &NoProgress).await.unwrap();
    let ep = store.pull(&entrypoint, &NoProgress).await.unwrap();
    let bb_expected = busybox_image(Compression::Gzip).unwrap();
    let layer = &bb_expected.layers[0];

    store.remove(&entrypoint).unwrap();
    assert!(store.get(&entrypoint).unwrap().is_none());
    assert!(store.get(&ep.id).unwrap().is_none());
    // The shared layer stays for busybox; the entrypoint image's own blobs are gone.
    assert_store_holds(
        &store,
        &[&bb.id, &bb.manifest_digest, &layer.digest],
        &[&layer.diff_id],
    );

    // A second reference keeps the image alive until it is removed as well.
    let by_digest = format!(
        "{}@{}",
        busybox.trim_end_matches(":latest"),
        bb.manifest_digest
    );
    store.pull(&by_digest, &NoProgress).await.unwrap();
    store.remove(&busybox).unwrap();
    assert_eq!(
        store.get(&bb.id).unwrap().unwrap().references,
        std::slice::from_ref(&by_digest)
    );
    store.remove(&bb.id[..19]).unwrap(); // by id prefix: the image and all its references
    assert!(store.list().unwrap().is_empty());
    assert_store_holds(&store, &[], &[]);

    let err = store.remove(&busybox).unwrap_err().to_string();
    assert!(err.contains("no such image"), "{err}");
}

#[tokio::test]
async fn missing_image_and_unreachable_registry_are_one_line_errors() {
    let registry = vmrun_tests::shared_registry().await.unwrap();
    let (_dir, store) = new_store();

    let nope = format!("{}/nope:latest", registry.addr());
    let err = store.pull(&nope, &NoProgress).await.unwrap_err();
    assert!(matches!(err, PullError::Registry { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg == format!("pull {nope}: manifest unknown")
            || msg.starts_with(&format!("pull {nope}: name unknown")),
        "{msg}"
    );

    // A known repository with an unknown tag.
    let busybox = vmrun_tests::shared_busybox().await.unwrap();
    let tag = busybox.replace(":latest", ":nosuchtag");
    let msg = store.pull(&tag, &NoProgress).await.unwrap_err().to_string();
    assert_eq!(msg, format!("pull {tag}: manifest unknown"));

    // Nothing listens on port 1.
    let msg = store
        .pull("127.0.0.1:1/x:latest", &NoProgress)
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("pull 127.0.0.1:1/x:latest: "), "{msg}");
    assert!(msg.to_lowercase().contains("connection refused"), "{msg}");
    assert!(
        !msg.contains('\n') && !msg.contains("{ "),
        "not a debug dump: {msg}"
    );

    let msg = store
        .pull("Bad Ref", &NoProgress)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("invalid image reference \"Bad Ref\""),
        "{msg}"
    );
    assert_store_holds(&store, &[], &[]);
}

#[tokio::test]
async fn tampered_blob_and_wrong_diff_id_are_refused() {
    // Own registry: its storage gets tampered with.
    let registry = tokio::task::spawn_blocking(Registry::start)
        .await
        .unwrap()
        .unwrap();
    let img = busybox_plus(vec![Entry::file("payload", b"genuine content")]);
    let reference = push_image(&registry.addr(), "test/tamper:v1", &img)
        .await
        .unwrap();
    let data_path = registry.blob_data_path(&img.layers[1].digest);
    let mut data = std::fs::read(&data_path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    std::fs::write(&data_path, data).unwrap();

    let (_dir, store) = new_store();
    let err = store.pull(&reference, &NoProgress).await.unwrap_err();
    assert!(matches!(err, PullError::DigestMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains(&img.layers[1].digest), "{err}");
    assert_store_holds(&store, &[], &[]);
    assert!(store.list().unwrap().is_empty());

    // Blobs intact, but the config claims a different uncompressed digest.
    let layers = vec![
        img.layers[0].clone(),
        Layer::new(
            layer_tar(&[Entry::file("payload", b"second image")]).unwrap(),
            Compression::Gzip,
        )
        .unwrap(),
    ];
    let wrong = images::sha256(b"something else");
    let fixed = ImageSpec::new(layers.clone())
        .build_with_diff_ids(&[layers[0].diff_id.clone(), wrong.clone()]);
    let reference = push_image(&registry.addr(), "test/tamper:v2", &fixed)
        .await
        .unwrap();
    let err = store.pull(&reference, &NoProgress).await.unwrap_err();
    match &err {
        PullError::Layer {
            source: LayerError::DiffIdMismatch { expected, .. },
            ..
        } => {
            assert_eq!(*expected, wrong)
        }
        other => panic!("expected a diff_id mismatch, got {other:?}"),
    }
    assert!(
        err.to_string().contains("uncompressed content is sha256:"),
        "{err}"
    );
    assert_store_holds(&store, &[], &[]);
}

#[tokio::test]
async fn malicious_layers_are_refused_and_leave_nothing_behind() {
    let registry = vmrun_tests::shared_registry().await.unwrap();
    let victim = tempfile::tempdir().unwrap();
    let victim_path = victim.path().display().to_string();
    let cases: Vec<(&str, Vec<Entry>, String)> = vec![
        (
            "dotdot",
            vec![Entry::file("../x", b"escape")],
            "\"../x\"".into(),
        ),
        (
            "dotdot-nested",
            vec![Entry::dir("a"), Entry::file("a/../../x", b"escape")],
            "\"a/../../x\"".into(),
        ),
        (
            "absolute",
            vec![Entry::file("/abs", b"escape")],
            "\"/abs\"".into(),
        ),
        (
            "symlink-escape",
            vec![
                Entry::symlink("evil", &victim_path),
                Entry::file("evil/passwd", b"owned"),
            ],
            "\"evil/passwd\": would be written through symlink \"evil\"".into(),
        ),
        (
            "symlink-dir-escape",
            vec![
                Entry::dir("d"),
                Entry::symlink("d/evil", &victim_path),
                Entry::dir("d/evil/sub"),
            ],
            "through symlink \"d/evil\"".into(),
        ),
        (
            "hardlink-outside",
            vec![Entry::hardlink("passwd", "../../../../etc/passwd")],
            "hardlink target \"../../../../etc/passwd\" is outside the layer".into(),
        ),
        (
            "hardlink-through-symlink",
            vec![
                Entry::symlink("etc", "/etc"),
                Entry::hardlink("passwd", "etc/passwd"),
            ],
            "hardlink target \"etc/passwd\" is outside the layer".into(),
        ),
        (
            "hardlink-absolute",
            vec![Entry::hardlink("passwd", "/etc/passwd")],
            "is outside the layer".into(),
        ),
    ];
    let (dir, store) = new_store();
    for (name, entries, needle) in cases {
        let img = busybox_plus(entries);
        let reference = push_image(&registry.addr(), &format!("test/evil:{name}"), &img)
            .await
            .unwrap();
        let err = store.pull(&reference, &NoProgress).await.unwrap_err();
        assert!(matches!(err, PullError::Layer { .. }), "{name}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&needle), "{name}: {msg}");
        assert!(msg.contains(&img.layers[1].digest), "{name}: {msg}");
        assert!(store.list().unwrap().is_empty(), "{name}");
        assert_store_holds(&store, &[], &[]);
        assert!(
            names(victim.path()).is_empty(),
            "{name} wrote into the victim dir"
        );
        assert!(!dir.path().join("x").exists() && !dir.path().join("store/x").exists());
        assert!(!Path::new("/abs").exists());
    }
}

#[tokio::test]
async fn truncated_gzip_layer_is_an_error() {
    let registry = vmrun_tests::shared_registry().await.unwrap();
    let mut img = busybox_plus(vec![Entry::file("big", &vec![7u8; 100_000])]);
    let layer = &mut img.layers[1];
    layer.blob.truncate(layer.blob.len() / 2);
    layer.digest = images::sha256(&layer.blob);
    let mut spec = ImageSpec::new(img.layers.clone());
    spec.cmd = vec!["sh".into()];
    let img = spec.build();
    let reference = push_image(&registry.addr(), "test/truncated:v1", &img)
        .await
        .unwrap();
    let (_dir, store) = new_store();
    let err = store.pull(&reference, &NoProgress).await.unwrap_err();
    assert!(
        matches!(
            err,
            PullError::Layer {
                source: LayerError::Archive(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert_store_holds(&store, &[], &[]);
}

/// Bytes that do not compress (xorshift), different for each `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// An image of one gzip layer holding `entries`.
fn one_layer_image(entries: &[Entry]) -> TestImage {
    let layer = Layer::new(layer_tar(entries).unwrap(), Compression::Gzip).unwrap();
    ImageSpec::new(vec![layer]).build()
}

/// Every stored blob hashes to its name; every stored layer is one of `layers`.
fn assert_blobs_verify(store: &ImageStore) {
    for name in names(&store.root().join("blobs/sha256")) {
        let data = std::fs::read(store.root().join("blobs/sha256").join(&name)).unwrap();
        assert_eq!(
            hex(&images::sha256(&data)),
            name,
            "blob {name} is not its content"
        );
    }
}

#[tokio::test]
async fn a_registry_dropping_a_layer_midway_leaves_the_store_consistent() {
    let registry = vmrun_tests::shared_registry().await.unwrap();
    let proxy = FaultProxy::start(&registry.addr()).await.unwrap();
    let data = noise(2 << 20, 1);
    let img = busybox_plus(vec![Entry::file("noise", &data)]);
    let layer = img.layers[1].digest.clone();
    let size = img.layers[1].blob.len() as u64;
    push_image(&registry.addr(), "test/faults:v1", &img)
        .await
        .unwrap();
    // Pulled through the proxy: the same registry under another address.
    let reference = format!("{}/test/faults:v1", proxy.addr());
    for fault in [
        Fault::DropAfter(0),
        Fault::DropAfter(size / 2),
        Fault::DropAfter(size - 1),
        Fault::ShortAfter(size / 2),
    ] {
        let (_dir, store) = new_store();
        proxy.set_fault(hex(&layer), fault);
        let before = proxy.faulted();
        let start = std::time::Instant::now();
        let err = store.pull(&reference, &NoProgress).await.unwrap_err();
        let took = start.elapsed();
        assert!(proxy.faulted() > before, "{fault:?}: the proxy cut nothing");
        let msg = err.to_string();
        println!("{fault:?} of {size} bytes: after {took:?}: {msg}");
        assert!(!msg.contains('\n'), "{fault:?}: not one line: {msg}");
        assert!(msg.starts_with(&format!("pull {reference}: ")), "{msg}");
        assert!(
            msg.contains(&layer),
            "{fault:?}: the layer is not named: {msg}"
        );
        assert!(matches!(err, PullError::Registry { .. }), "{err:?}");
        match fault {
            Fault::ShortAfter(n) => assert!(
                msg.ends_with(&format!(
                    "blob {layer}: the registry sent {n} of its {size} bytes"
                )),
                "{msg}"
            ),
            Fault::DropAfter(n) => assert!(
                msg.contains(&format!(
                    "reading blob {layer} (after {n} of {size} bytes): "
                )),
                "{msg}"
            ),
            Fault::Pass => unreachable!(),
        }
        // Nothing of the failed pull stays: no image, no blob, no layer, no temporary.
        assert!(store.list().unwrap().is_empty());
        assert!(store.get(&reference).unwrap().is_none());
        assert_store_holds(&store, &[], &[]);

        // The registry heals: the next pull fetches again, verifies and stores the image.
        proxy.heal();
        let image = store.pull(&reference, &NoProgress).await.unwrap();
        assert_eq!(image.id, img.config_digest);
        assert_eq!(std::fs::read(image.layers[1].join("noise")).unwrap(), data);
        assert_blobs_verify(&store);
        assert_store_holds(
            &store,
            &[
                &img.manifest_digest,
                &img.config_digest,
                &img.layers[0].digest,
                &layer,
            ],
            &[&img.layers[0].diff_id, &img.layers[1].diff_id],
        );
    }
}

/// A small tmpfs, unmounted when dropped (a failing test included).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(kib: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={kib}k,mode=0755").as_str()),
        )
        .unwrap();
        Tmpfs { dir }
    }

    fn resize(&self, kib: u64) {
        nix::mount::mount(
            Some("tmpfs"),
            self.dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::MS_REMOUNT,
            Some(format!("size={kib}k").as_str()),
        )
        .unwrap();
    }

    fn used_kib(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(self.dir.path()).unwrap();
        (st.blocks() - st.blocks_free()) * st.fragment_size() / 1024
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test]
async fn a_full_disk_fails_the_pull_clearly_and_a_pull_after_freeing_space_works() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: a_full_disk_fails_the_pull_clearly_and_a_pull_after_freeing_space_works needs root (mount)");
        return;
    }
    let registry = vmrun_tests::shared_registry().await.unwrap();
    // Fills the disk while the blob downloads (3 MiB that do not compress), and while the
    // layer unpacks (a 6 MiB file of zeros in a blob of a few KiB).
    let noisy = one_layer_image(&[Entry::file("noise", &noise(3 << 20, 2))]);
    let zeros = one_layer_image(&[Entry::dir("d"), Entry::file("d/zeros", &vec![0; 6 << 20])]);
    let noisy_ref = push_image(&registry.addr(), "test/full:blob", &noisy)
        .await
        .unwrap();
    let zeros_ref = push_image(&registry.addr(), "test/full:unpack", &zeros)
        .await
        .unwrap();
    let disk = Tmpfs::mount(2048);
    let store = ImageStore::open(disk.dir.path().join("store"), RegistryConfig::default()).unwrap();
    let empty = disk.used_kib();

    let err = store.pull(&noisy_ref, &NoProgress).await.unwrap_err();
    let msg = err.to_string();
    println!("blob on a full disk: {msg}");
    assert!(matches!(err, PullError::BlobStore { .. }), "{err:?}");
    let tmp = store.root().join("tmp");
    assert!(
        msg.starts_with(&format!(
            "pull {noisy_ref}: blob {}: image store {}/blob-",
            noisy.layers[0].digest,
            tmp.display()
        )),
        "{msg}"
    );
    assert!(
        msg.ends_with("No space left on device (os error 28)"),
        "{msg}"
    );
    assert_store_holds(&store, &[], &[]);

    let err = store.pull(&zeros_ref, &NoProgress).await.unwrap_err();
    let msg = err.to_string();
    println!("layer on a full disk: {msg}");
    assert!(
        matches!(
            err,
            PullError::Layer {
                source: LayerError::Write { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        msg.starts_with(&format!(
            "pull {zeros_ref}: layer {}: entry \"d/zeros\": writing {}/layer-",
            zeros.layers[0].digest,
            tmp.display()
        )),
        "{msg}"
    );
    assert!(
        msg.ends_with("/d/zeros: No space left on device (os error 28)"),
        "{msg}"
    );
    // Nothing half-written is kept, nor used: the space is free again and no image is known.
    assert_store_holds(&store, &[], &[]);
    assert!(store.list().unwrap().is_empty());
    assert!(
        disk.used_kib() <= empty + 64,
        "{} KiB used after the failed pulls, {empty} KiB before",
        disk.used_kib()
    );
    let err = store
        .ensure(&zeros_ref, PullPolicy::Never, &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, PullError::NotPresent { .. }), "{err:?}");

    // More space: both pull, and what is stored verifies.
    disk.resize(32 * 1024);
    let a = store.pull(&noisy_ref, &NoProgress).await.unwrap();
    let b = store
        .ensure(&zeros_ref, PullPolicy::IfNotPresent, &NoProgress)
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(b.layers[0].join("d/zeros"))
            .unwrap()
            .len(),
        6 << 20
    );
    assert_eq!(
        std::fs::read(a.layers[0].join("noise")).unwrap(),
        noise(3 << 20, 2)
    );
    assert_blobs_verify(&store);
    drop(store);
}

#[tokio::test]
async fn pull_policies() {
    let registry = tokio::task::spawn_blocking(Registry::start)
        .await
        .unwrap()
        .unwrap();
    let img = busybox_plus(vec![Entry::file("policy", b"x")]);
    let reference = push_image(&registry.addr(), "test/policy:v1", &img)
        .await
        .unwrap();
    let (_dir, store) = new_store();

    let err = store
        .ensure(&reference, PullPolicy::Never, &NoProgress)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("image {reference} is not present locally and the pull policy is Never")
    );
    let pulled = store
        .ensure(&reference, PullPolicy::IfNotPresent, &NoProgress)
        .await
        .unwrap();
    assert_eq!(pulled.id, img.config_digest);

    drop(registry); // from here on, only local content can satisfy a request
    let progress = Recorder::default();
    let local = store
        .ensure(&reference, PullPolicy::IfNotPresent, &progress)
        .await
        .unwrap();
    assert_eq!(local, pulled);
    assert!(progress.started.lock().unwrap().is_empty());
    assert_eq!(
        store
            .ensure(&reference, PullPolicy::Never, &NoProgress)
            .await
            .unwrap(),
        pulled
    );
    let err = store
        .ensure(&reference, PullPolicy::Always, &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, PullError::Registry { .. }), "{err:?}");
    assert!(
        store.get(&reference).unwrap().is_some(),
        "failed pull keeps the old image"
    );
}

#[tokio::test]
async fn concurrent_pulls_of_the_same_image() {
    let registry = vmrun_tests::shared_registry().await.unwrap();
    let img = busybox_plus(vec![Entry::file("concurrent", b"x")]);
    let reference = push_image(&registry.addr(), "test/concurrent:v1", &img)
        .await
        .unwrap();
    let (_dir, store) = new_store();
    // Separate handles behave like separate processes (own lock file descriptions).
    let other = ImageStore::open(store.root(), RegistryConfig::default()).unwrap();
    let (a, b, c) = tokio::join!(
        store.pull(&reference, &NoProgress),
        other.pull(&reference, &NoProgress),
        store.pull(&reference, &NoProgress),
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    assert_eq!((&a.id, &a.layers), (&b.id, &b.layers));
    assert_eq!(a, c);
    assert_store_holds(
        &store,
        &[
            &img.config_digest,
            &img.manifest_digest,
            &img.layers[0].digest,
            &img.layers[1].digest,
        ],
        &[&img.layers[0].diff_id, &img.layers[1].diff_id],
    );
    check_busybox_rootfs(&a.layers[0]);
}

#[tokio::test]
async fn insecure_registry_config_for_a_non_localhost_address() {
    // 127.0.0.2 is loopback too, but not one of the names the store speaks plain HTTP to
    // unless configured.
    let registry = match tokio::task::spawn_blocking(|| {
        Registry::start_on(std::net::Ipv4Addr::new(127, 0, 0, 2))
    })
    .await
    .unwrap()
    {
        Ok(r) => r,
        Err(e) => {
            println!("skipping: cannot run a registry on 127.0.0.2: {e:#}");
            return;
        }
    };
    let img = busybox_plus(vec![Entry::file("insecure", b"x")]);
    let reference = push_image(&registry.addr(), "test/insecure:v1", &img)
        .await
        .unwrap();

    let (_dir, store) = new_store();
    let err = store.pull(&reference, &NoProgress).await.unwrap_err();
    assert!(
        matches!(err, PullError::Registry { .. }),
        "HTTPS to a plain-HTTP registry: {err:?}"
    );

    let config = RegistryConfig::from_config_toml(&format!(
        "[registries]\ninsecure = [\"{}\"]\n[registries.auth.\"other:5000\"]\nusername = \"u\"\npassword = \"p\"\n",
        registry.addr()
    ))
    .unwrap();
    assert_eq!(config.insecure, [registry.addr()]);
    let insecure = ImageStore::open(store.root(), config).unwrap();
    let image = insecure.pull(&reference, &NoProgress).await.unwrap();
    assert_eq!(image.id, img.config_digest);
}

#[test]
fn open_creates_layout_and_discards_interrupted_work() {
    let (_dir, store) = new_store();
    for sub in ["blobs/sha256", "layers/sha256", "images/sha256", "tmp"] {
        assert!(store.root().join(sub).is_dir(), "{sub}");
    }
    // What an interrupted pull leaves: a partial download and a half-unpacked layer.
    std::fs::write(store.root().join("tmp/blob-partial"), b"half").unwrap();
    std::fs::create_dir_all(store.root().join("tmp/layer-partial/etc")).unwrap();
    let reopened = ImageStore::open(store.root(), RegistryConfig::default()).unwrap();
    assert_store_holds(&reopened, &[], &[]);
}

#[tokio::test]
async fn basic_auth_credentials_from_config() {
    // bcrypt (cost 4, for speed) of "vmrun-pass" in htpasswd format, precomputed so no htpasswd tool is needed.
    const HASH: &str = "$2b$04$eYzYOZlA2gMMYE.K5ieW1OBkFelcNlwErpMGH0PwE1W3HTZoOWbTW";
    let registry = tokio::task::spawn_blocking(|| Registry::start_with_basic_auth("vmrun", HASH))
        .await
        .unwrap()
        .unwrap();
    let img = busybox_plus(vec![Entry::file("auth", b"x")]);
    let creds = oci_client::secrets::RegistryAuth::Basic("vmrun".into(), "vmrun-pass".into());
    let reference = images::push_image_as(&registry.addr(), "test/private:v1", &img, creds)
        .await
        .unwrap();

    let (_dir, store) = new_store();
    let msg = store
        .pull(&reference, &NoProgress)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with(&format!("pull {reference}: unauthorized")),
        "{msg}"
    );

    let mut config = RegistryConfig::default();
    config.auth.insert(
        registry.addr(),
        vmrun_image::Credentials {
            username: "vmrun".into(),
            password: "wrong".into(),
        },
    );
    let wrong = ImageStore::open(store.root(), config.clone()).unwrap();
    let msg = wrong
        .pull(&reference, &NoProgress)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with(&format!("pull {reference}: unauthorized")),
        "{msg}"
    );

    config.auth.get_mut(&registry.addr()).unwrap().password = "vmrun-pass".into();
    let authed = ImageStore::open(store.root(), config).unwrap();
    assert_eq!(
        authed.pull(&reference, &NoProgress).await.unwrap().id,
        img.config_digest
    );
}

#[tokio::test]
async fn a_mirror_serves_a_registry_and_the_image_keeps_its_name() {
    let registry = vmrun_tests::shared_registry().await.unwrap();
    let img = busybox_plus(vec![Entry::file("mirrored", b"x")]);
    push_image(&registry.addr(), "e2e/mirrored:v1", &img)
        .await
        .unwrap();
    // Only the mirror is asked: it answers, so the registry itself (which
    // does not exist) is never tried.
    let config = RegistryConfig::from_config_toml(&format!(
        "[registries.mirrors]\n\"registry.example.invalid\" = [\"http://{}\"]\n",
        registry.addr()
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path().join("store"), config).unwrap();
    let image = store
        .pull("registry.example.invalid/e2e/mirrored:v1", &NoProgress)
        .await
        .unwrap();
    assert_eq!(image.id, img.config_digest);
    assert_eq!(
        image.references,
        ["registry.example.invalid/e2e/mirrored:v1"]
    );
}

// ---- WebAssembly images: Wasm OCI artifacts, build-wasm, push ----

/// The `vmrun` binary alone (the image commands need nothing beside it), built once.
fn vmrun_image_bin() -> &'static Path {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| workspace.join("target"));
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--quiet", "-p", "vmrun", "--bin", "vmrun"])
            .current_dir(workspace)
            .status()
            .unwrap();
        assert!(status.success(), "building vmrun failed");
        target.join("debug/vmrun")
    })
}

/// Runs `vmrun --root ROOT image ARGS…`; returns (success, stdout, stderr).
fn vmrun_image(root: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(vmrun_image_bin())
        .arg("--root")
        .arg(root)
        .arg("image")
        .args(args)
        .env_remove("VMRUN_CONFIG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const TINY_WAT: &str = r#"(module (func (export "_start")) (memory (export "memory") 1))"#;

#[tokio::test]
async fn build_wasm_push_and_pull_into_another_store() {
    let wasm = wat::parse_str(TINY_WAT).unwrap();
    let registry = tokio::task::spawn_blocking(Registry::start)
        .await
        .unwrap()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tiny.wasm");
    std::fs::write(&file, &wasm).unwrap();
    let root = dir.path().join("store-a");
    let reference = format!("{}/test/wasm-built:1", registry.addr());

    let (ok, out, err) = vmrun_image(
        &root,
        &["build-wasm", file.to_str().unwrap(), "-t", &reference],
    );
    assert!(ok, "build-wasm: {err}");
    assert!(
        out.contains(&reference) && out.contains("wasip1/wasm"),
        "{out}"
    );
    let (ok, out, err) = vmrun_image(&root, &["ls"]);
    assert!(ok, "{err}");
    assert!(out.contains(&reference), "{out}");
    let (ok, out, err) = vmrun_image(&root, &["inspect", &reference]);
    assert!(ok, "{err}");
    let inspected: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        inspected["config"]["entrypoint"],
        serde_json::json!(["/module.wasm"])
    );
    assert_eq!(inspected["config"]["cmd"], serde_json::json!([]));
    assert_eq!(inspected["config"]["env"], serde_json::json!([]));
    assert_eq!(inspected["config"]["os"], "wasip1");
    assert_eq!(inspected["config"]["architecture"], "wasm");
    let built_id = inspected["id"].as_str().unwrap().to_string();

    // The stored artifact is the Wasm OCI layout: wasm config, one application/wasm layer.
    let manifest_digest = inspected["manifest_digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("blobs/sha256").join(hex(manifest_digest))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.wasm.config.v0+json"
    );
    assert_eq!(manifest["layers"][0]["mediaType"], "application/wasm");
    assert_eq!(manifest["layers"][0]["digest"], images::sha256(&wasm));

    // Building the same file again gives the same image.
    let (ok, out, _) = vmrun_image(
        &root,
        &["build-wasm", file.to_str().unwrap(), "-t", &reference],
    );
    assert!(ok && out.contains(&built_id), "{out}");

    let (ok, out, err) = vmrun_image(&root, &["push", &reference]);
    assert!(ok, "push: {err}");
    assert!(out.contains(&format!("pushed {reference}")), "{out}");
    assert!(
        err.contains("done") || err.contains("already"),
        "no per-blob progress: {err}"
    );
    let other = format!("{}/other/copy:2", registry.addr());
    let (ok, _, err) = vmrun_image(&root, &["push", &reference, "--to", &other]);
    assert!(ok, "push --to: {err}");

    for r in [&reference, &other] {
        let (_d, store) = new_store();
        let image = store.pull(r, &NoProgress).await.unwrap();
        assert_eq!(image.id, built_id, "{r}");
        assert_eq!(image.manifest_digest, manifest_digest, "{r}");
        assert_eq!(image.config.entrypoint, ["/module.wasm"]);
        assert!(image.config.cmd.is_empty() && image.config.env.is_empty());
        assert_eq!(
            (image.config.os.as_str(), image.config.architecture.as_str()),
            ("wasip1", "wasm")
        );
        assert_eq!(image.layers.len(), 1);
        let module = image.layers[0].join("module.wasm");
        assert!(std::fs::symlink_metadata(&module).unwrap().is_file());
        assert_eq!(std::fs::read(&module).unwrap(), wasm);
        assert_eq!(names(&image.layers[0]), ["module.wasm"]);
        // Artifacts are for the wasm runtime, not for microVM block images.
        let err = store.block_image(&image).unwrap_err();
        assert!(
            matches!(err, vmrun_image::BlockImageError::WasmArtifact { .. }),
            "{err}"
        );
    }
}

#[tokio::test]
async fn build_wasm_refuses_what_is_not_wasm() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let cases: [(&str, &[u8], &str); 3] = [
        ("script.wasm", b"#!/bin/sh\necho hi\n", "23 21 2f 62"),
        ("short.wasm", b"\0as", "only 3 bytes"),
        ("v2.wasm", b"\0asm\x02\0\0\0", "02 00 00 00"),
    ];
    for (name, bytes, found) in cases {
        let file = dir.path().join(name);
        std::fs::write(&file, bytes).unwrap();
        let (ok, _, err) = vmrun_image(
            &root,
            &["build-wasm", file.to_str().unwrap(), "-t", "test/x:1"],
        );
        assert!(!ok, "{name} accepted");
        assert!(err.contains(file.to_str().unwrap()), "{name}: {err}");
        assert!(err.contains("not a WebAssembly"), "{name}: {err}");
        assert!(err.contains(found), "{name}: {err}");
    }
    let (ok, _, err) = vmrun_image(
        &root,
        &["build-wasm", "/nonexistent/x.wasm", "-t", "test/x:1"],
    );
    assert!(!ok && err.contains("/nonexistent/x.wasm"), "{err}");
    let (ok, out, _) = vmrun_image(&root, &["ls"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 1, "something was stored: {out}");
    let store = ImageStore::open(&root, RegistryConfig::default()).unwrap();
    assert!(store.list().unwrap().is_empty());
    assert_store_holds(&store, &[], &[]);
}

/// Pushes a Wasm OCI artifact (wasm config, `application/wasm` layers) straight to a registry.
async fn push_wasm_artifact(
    registry: &Registry,
    repo_tag: &str,
    wasm: &[u8],
    layer_digests: &[String],
) -> (String, String) {
    let config = serde_json::to_vec(&serde_json::json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": "wasm",
        "os": "wasip1",
        "layerDigests": layer_digests,
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": images::OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.wasm.config.v0+json",
            "digest": images::sha256(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/wasm",
            "digest": images::sha256(wasm),
            "size": wasm.len(),
        }],
    }))
    .unwrap();
    let image = TestImage {
        layers: vec![Layer {
            tar: Vec::new(),
            blob: wasm.to_vec(),
            media_type: "application/wasm".into(),
            digest: images::sha256(wasm),
            diff_id: String::new(),
        }],
        config_digest: images::sha256(&config),
        manifest_digest: images::sha256(&manifest),
        manifest_media_type: images::OCI_MANIFEST.into(),
        config,
        manifest,
    };
    let reference = push_image(&registry.addr(), repo_tag, &image)
        .await
        .unwrap();
    (reference, image.config_digest)
}

#[tokio::test]
async fn registry_served_wasm_images_pull() {
    let wasm = wat::parse_str(TINY_WAT).unwrap();
    let registry = tokio::task::spawn_blocking(Registry::start)
        .await
        .unwrap()
        .unwrap();
    let (_dir, store) = new_store();

    // A Wasm OCI artifact as other tools push it.
    let (reference, id) = push_wasm_artifact(
        &registry,
        "test/artifact:1",
        &wasm,
        &[images::sha256(&wasm)],
    )
    .await;
    let image = store.pull(&reference, &NoProgress).await.unwrap();
    assert_eq!(image.id, id);
    assert_eq!(image.config.entrypoint, ["/module.wasm"]);
    assert_eq!(
        std::fs::read(image.layers[0].join("module.wasm")).unwrap(),
        wasm
    );

    // Its layerDigests must agree with the manifest.
    let (bad, _) = push_wasm_artifact(
        &registry,
        "test/artifact:bad",
        &wasm,
        &[images::sha256(b"x")],
    )
    .await;
    let err = store.pull(&bad, &NoProgress).await.unwrap_err();
    assert!(err.to_string().contains("layerDigests"), "{err}");

    // An ordinary image whose tar layer holds /app.wasm (what the wasm runtime also runs).
    let ordinary = images::push_wasm_image(&registry, "test/ordinary-wasm:1", &wasm)
        .await
        .unwrap();
    let expected = images::wasm_image(&wasm);
    let image = store.pull(&ordinary, &NoProgress).await.unwrap();
    assert_eq!(image.id, expected.config_digest);
    assert_eq!(image.config.entrypoint, ["/app.wasm"]);
    assert!(image.config.cmd.is_empty());
    assert_eq!(image.config.os, "wasip1");
    let app = image.layers[0].join("app.wasm");
    assert_eq!(std::fs::read(&app).unwrap(), wasm);
    assert_eq!(
        std::fs::metadata(&app).unwrap().permissions().mode() & 0o7777,
        0o755
    );
}

#[tokio::test]
async fn push_of_an_ordinary_image_keeps_its_id() {
    let registry = tokio::task::spawn_blocking(Registry::start)
        .await
        .unwrap()
        .unwrap();
    let source = images::push_busybox(&registry, "test/busybox:1")
        .await
        .unwrap();
    let (_a, store) = new_store();
    let pulled = store.pull(&source, &NoProgress).await.unwrap();
    let copy = format!("{}/copies/busybox:2", registry.addr());
    let recorder = Recorder::default();
    let pushed = store
        .push(&pulled.id, Some(&copy), &recorder)
        .await
        .unwrap();
    assert_eq!(pushed, copy);
    // One progress report per blob (layer and config), as a pull reports layers.
    let mut finished = recorder.finished.lock().unwrap().clone();
    finished.sort();
    let mut want = vec![
        pulled.id.clone(),
        busybox_image(Compression::Gzip).unwrap().layers[0]
            .digest
            .clone(),
    ];
    want.sort();
    assert_eq!(finished, want);
    let err = store.push(&pulled.id, None, &NoProgress).await.unwrap_err();
    assert!(err.to_string().contains("--to"), "{err}");

    let (_b, other) = new_store();
    let again = other.pull(&copy, &NoProgress).await.unwrap();
    assert_eq!(again.id, pulled.id);
    assert_eq!(again.manifest_digest, pulled.manifest_digest);
    check_busybox_rootfs(&again.layers[0]);
}
