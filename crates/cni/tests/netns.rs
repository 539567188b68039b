//! Pinned network namespaces: made on a side thread, entered on a side
//! thread, removed idempotently. Needs root (mount, unshare).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use vmrun_cni::{netns, NetNs, NetNsError};

/// (device, inode) identifies a namespace.
fn ns_id(path: &Path) -> (u64, u64) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.dev(), meta.ino())
}

fn own_ns() -> (u64, u64) {
    ns_id(Path::new("/proc/thread-self/ns/net"))
}

#[test]
fn create_pins_a_new_namespace_without_moving_the_caller() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sub/dir/pod");
    let before = own_ns();
    let ns = NetNs::create(&path).expect("create");
    assert_eq!(own_ns(), before, "the calling thread changed namespace");
    let pinned = ns_id(&path);
    assert_ne!(pinned, before);

    let inside = ns.run(own_ns).expect("run inside");
    assert_eq!(inside, pinned);
    assert_eq!(own_ns(), before);

    // Creating over an existing pin is refused and leaves it as it was.
    let error = NetNs::create(&path).expect_err("path exists");
    assert!(matches!(error, NetNsError::CreateFile { .. }), "{error:?}");
    assert_eq!(ns_id(&path), pinned);

    ns.remove().expect("remove");
    assert!(!path.exists());
    netns::remove(&path).expect("removing again is fine");
}

#[test]
fn pin_process_pins_that_process_namespace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("self");
    let ns = NetNs::pin_process(std::process::id(), &path).expect("pin own process");
    assert_eq!(ns_id(ns.path()), ns_id(Path::new("/proc/self/ns/net")));
    // Unpinning does not touch the namespace itself.
    ns.remove().expect("remove");
    assert!(!path.exists());
    assert!(Path::new("/proc/self/ns/net").exists());
}

#[test]
fn a_plain_file_is_removed_and_a_missing_path_is_not_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stale");
    std::fs::write(&path, b"").expect("write");
    netns::remove(&path).expect("unmounted leftover file");
    assert!(!path.exists());
    netns::remove(&dir.path().join("never-existed")).expect("nothing there");
}

#[test]
fn entering_a_missing_namespace_names_it() {
    let error = netns::run_in(Path::new("/nonexistent/netns/pod"), || ()).expect_err("missing");
    assert!(
        error.to_string().contains("/nonexistent/netns/pod"),
        "{error}"
    );
    assert!(NetNs::open("/nonexistent/netns/pod").is_err());
}

#[test]
fn a_panic_inside_is_an_error_not_a_panic_of_the_caller() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ns = NetNs::create(dir.path().join("pod")).expect("create");
    let outcome = ns.run(|| panic!("inside"));
    let removed = ns.remove();
    assert!(matches!(outcome, Err(NetNsError::Panicked { .. })));
    removed.expect("remove");
}
