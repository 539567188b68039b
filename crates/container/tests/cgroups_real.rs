//! The cgroup code against the real kernel: this host's v1 hierarchies and
//! its (controller-less) cgroup2 mount at /sys/fs/cgroup/unified.

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use vmrun_container::cgroups::{self, CgroupVersion};

/// A shell that, once released through stdin, keeps forking (a small fork
/// bomb capped at 200 processes), to check that kill_all wins the race.
fn spawn_forker() -> Child {
    Command::new("/bin/sh")
        .args([
            "-c",
            "read go; i=0; while [ $i -lt 200 ]; do sleep 60 & i=$((i+1)); done; wait",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Lets the forker go, now that it is inside the cgroup.
fn release(child: &mut Child) {
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
}

#[test]
fn v1_kill_all_and_remove_on_the_host() {
    common::require_root("v1_kill_all_and_remove_on_the_host");
    let root = Path::new("/sys/fs/cgroup");
    if cgroups::detect_version(root) != CgroupVersion::V1 {
        println!("v1_kill_all_and_remove_on_the_host: host is cgroup v2, covered by the v2 test");
        return;
    }
    let path = format!("/vmrun-test-{}-v1kill/ctr", std::process::id());
    let cg = cgroups::open(&path, None).unwrap();
    // The child waits until it is in the cgroup, so every fork lands there.
    let mut child = spawn_forker();
    cg.add_pid(child.id() as i32).unwrap();
    release(&mut child);
    std::thread::sleep(Duration::from_millis(300));
    assert!(cg.pids().len() > 1, "{:?}", cg.pids());
    cg.kill_all().unwrap();
    assert!(cg.pids().is_empty());
    let _ = child.wait();
    cg.remove().unwrap();
    cg.remove().unwrap(); // idempotent
    cgroups::remove_path(&format!("/vmrun-test-{}-v1kill", std::process::id())).unwrap();
    for entry in std::fs::read_dir(root).unwrap().flatten() {
        let p = entry
            .path()
            .join(format!("vmrun-test-{}-v1kill", std::process::id()));
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

#[test]
fn v2_kill_all_and_remove_on_a_real_cgroup2_mount() {
    common::require_root("v2_kill_all_and_remove_on_a_real_cgroup2_mount");
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(Path::new)
        .find(|r| cgroups::detect_version(r) == CgroupVersion::V2)
        .expect("a cgroup2 mount at /sys/fs/cgroup or /sys/fs/cgroup/unified");
    let parent = format!("/vmrun-test-{}-v2kill", std::process::id());
    let path = format!("{parent}/ctr");
    let cg = cgroups::open_at(root, &path, None).unwrap();
    let mut child = spawn_forker();
    cg.add_pid(child.id() as i32).unwrap();
    release(&mut child);
    std::thread::sleep(Duration::from_millis(300));
    assert!(cg.pids().len() > 1, "{:?}", cg.pids());
    cg.kill_all().unwrap();
    assert!(cg.pids().is_empty());
    let _ = child.wait();
    cg.remove().unwrap();
    cgroups::remove_path_at(root, &parent).unwrap();
    assert!(!root.join(parent.trim_start_matches('/')).exists());
}
