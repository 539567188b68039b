//! v1/v2 file mapping against fake cgroup roots in a tempdir.

use std::fs;
use std::path::Path;

use oci_spec::runtime::LinuxResources;

use super::*;

fn resources(json: &str) -> LinuxResources {
    serde_json::from_str(json).expect("valid LinuxResources json")
}

fn read(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p.as_ref())
        .unwrap_or_else(|e| panic!("read {}: {e}", p.as_ref().display()))
        .trim()
        .to_string()
}

/// A v1 layout like this host's, plus a hybrid `unified` v2 mount that must
/// be ignored and a `cpu,cpuacct`-style alias.
fn fake_v1_root() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    for c in [
        "memory",
        "cpuset",
        "pids",
        "freezer",
        "devices",
        "cpu,cpuacct",
        "systemd",
    ] {
        fs::create_dir(t.path().join(c)).unwrap();
        fs::write(t.path().join(c).join("cgroup.procs"), "").unwrap();
    }
    std::os::unix::fs::symlink("cpu,cpuacct", t.path().join("cpu")).unwrap();
    fs::write(t.path().join("cpuset/cpuset.cpus"), "0-1\n").unwrap();
    fs::write(t.path().join("cpuset/cpuset.mems"), "0\n").unwrap();
    fs::create_dir(t.path().join("unified")).unwrap();
    fs::write(t.path().join("unified/cgroup.procs"), "").unwrap();
    fs::write(t.path().join("unified/cgroup.controllers"), "hugetlb").unwrap();
    t
}

fn fake_v2_root() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    fs::write(
        t.path().join("cgroup.controllers"),
        "cpuset cpu io memory hugetlb pids rdma\n",
    )
    .unwrap();
    fs::write(t.path().join("cgroup.subtree_control"), "").unwrap();
    fs::write(t.path().join("cgroup.procs"), "").unwrap();
    t
}

#[test]
fn detects_versions() {
    assert_eq!(detect_version(fake_v1_root().path()), CgroupVersion::V1);
    assert_eq!(detect_version(fake_v2_root().path()), CgroupVersion::V2);
}

#[test]
fn v1_hierarchies_skip_unified_and_aliases() {
    let root = fake_v1_root();
    let hs = v1::hierarchies(root.path()).unwrap();
    let names: Vec<String> = hs.iter().map(|h| h.controllers.join(",")).collect();
    assert_eq!(
        names,
        [
            "cpu,cpuacct",
            "cpuset",
            "devices",
            "freezer",
            "memory",
            "pids",
            "systemd"
        ]
    );
}

#[test]
fn v1_mapping() {
    let root = fake_v1_root();
    let r = resources(
        r#"{"memory":{"limit":8388608,"swap":8388608,"reservation":4194304},
            "cpu":{"shares":512,"quota":50000,"period":100000,"cpus":"1"},
            "pids":{"limit":10},
            "devices":[{"allow":false,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":3,"access":"rwm"}]}"#,
    );
    let cg = open_at(root.path(), "/vmrun/pod/ctr", Some(&r)).unwrap();
    let p = root.path();
    assert_eq!(cg.path(), "/vmrun/pod/ctr");
    assert_eq!(
        read(p.join("memory/vmrun/pod/ctr/memory.limit_in_bytes")),
        "8388608"
    );
    // No memsw file in the fake: swap == limit means "no swap", accepted.
    assert!(!p
        .join("memory/vmrun/pod/ctr/memory.memsw.limit_in_bytes")
        .exists());
    assert_eq!(
        read(p.join("memory/vmrun/pod/ctr/memory.soft_limit_in_bytes")),
        "4194304"
    );
    assert_eq!(read(p.join("cpu,cpuacct/vmrun/pod/ctr/cpu.shares")), "512");
    assert_eq!(
        read(p.join("cpu,cpuacct/vmrun/pod/ctr/cpu.cfs_quota_us")),
        "50000"
    );
    assert_eq!(
        read(p.join("cpu,cpuacct/vmrun/pod/ctr/cpu.cfs_period_us")),
        "100000"
    );
    assert_eq!(read(p.join("pids/vmrun/pod/ctr/pids.max")), "10");
    // Explicit cpus win; mems is inherited from the root on every level.
    assert_eq!(read(p.join("cpuset/vmrun/pod/ctr/cpuset.cpus")), "1");
    assert_eq!(read(p.join("cpuset/vmrun/cpuset.cpus")), "0-1");
    assert_eq!(read(p.join("cpuset/vmrun/pod/ctr/cpuset.mems")), "0");
    // Last rule written wins in a plain file; the kernel applies each write.
    assert_eq!(
        read(p.join("devices/vmrun/pod/ctr/devices.allow")),
        "c 1:3 rwm"
    );
    assert_eq!(read(p.join("devices/vmrun/pod/ctr/devices.deny")), "a");
    assert!(!p.join("unified/vmrun").exists());
    assert!(p.join("systemd/vmrun/pod/ctr").is_dir());

    cg.add_pid(4242).unwrap();
    assert_eq!(read(p.join("freezer/vmrun/pod/ctr/cgroup.procs")), "4242");
    assert_eq!(cg.pids(), vec![4242]);
    fs::write(p.join("pids/vmrun/pod/ctr/cgroup.procs"), "").unwrap();

    fs::write(
        p.join("memory/vmrun/pod/ctr/memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
    )
    .unwrap();
    assert_eq!(cg.oom_kill_count(), 2);
    fs::write(
        p.join("memory/vmrun/pod/ctr/memory.usage_in_bytes"),
        "1234\n",
    )
    .unwrap();
    fs::write(p.join("cpu,cpuacct/vmrun/pod/ctr/cpuacct.usage"), "99\n").unwrap();
    fs::write(p.join("pids/vmrun/pod/ctr/pids.current"), "3\n").unwrap();
    assert_eq!(
        cg.stats(),
        CgroupStats {
            memory_usage_bytes: 1234,
            cpu_usage_ns: 99,
            pids: 3
        }
    );

    cg.remove().unwrap();
    assert!(!p.join("memory/vmrun/pod/ctr").exists());
    assert!(p.join("memory/vmrun/pod").exists());
    remove_path_at(p, "/vmrun").unwrap();
    assert!(!p.join("memory/vmrun").exists());
    assert!(!p.join("cpuset/vmrun").exists());
}

#[test]
fn v1_memsw_order_when_growing() {
    let root = fake_v1_root();
    let dir = root.path().join("memory/c");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("memory.memsw.limit_in_bytes"), "1000").unwrap();
    let r = resources(r#"{"memory":{"limit":2000,"swap":4000}}"#);
    open_at(root.path(), "c", Some(&r)).unwrap();
    assert_eq!(read(dir.join("memory.memsw.limit_in_bytes")), "4000");
    assert_eq!(read(dir.join("memory.limit_in_bytes")), "2000");
}

#[test]
fn v1_swap_without_memsw_is_an_error() {
    let root = fake_v1_root();
    let r = resources(r#"{"memory":{"limit":2000,"swap":4000}}"#);
    let err = open_at(root.path(), "/c", Some(&r))
        .unwrap_err()
        .to_string();
    assert!(err.contains("memory.swap"), "{err}");
}

#[test]
fn v1_unified_is_rejected() {
    let root = fake_v1_root();
    let r = resources(r#"{"unified":{"memory.high":"1"}}"#);
    assert!(open_at(root.path(), "/c", Some(&r)).is_err());
}

#[test]
fn v2_mapping() {
    let root = fake_v2_root();
    let r = resources(
        r#"{"memory":{"limit":8388608,"swap":16777216},
            "cpu":{"shares":1024,"quota":50000,"period":100000,"cpus":"0","mems":"0"},
            "pids":{"limit":0},
            "blockIO":{"weight":500},
            "unified":{"memory.high":"7000000"}}"#,
    );
    let p = root.path();
    fs::create_dir_all(p.join("vmrun/ctr")).unwrap();
    fs::write(p.join("vmrun/ctr/memory.swap.max"), "max").unwrap();
    let cg = open_at(p, "/vmrun/ctr", Some(&r)).unwrap();
    assert_eq!(
        read(p.join("cgroup.subtree_control")),
        "+cpuset +cpu +io +memory +hugetlb +pids"
    );
    let c = p.join("vmrun/ctr");
    assert_eq!(read(c.join("memory.max")), "8388608");
    assert_eq!(read(c.join("memory.swap.max")), "8388608");
    assert_eq!(read(c.join("cpu.weight")), "39");
    assert_eq!(read(c.join("cpu.max")), "50000 100000");
    assert_eq!(read(c.join("cpuset.cpus")), "0");
    assert_eq!(read(c.join("pids.max")), "max");
    assert_eq!(read(c.join("io.weight")), "default 4950");
    assert_eq!(read(c.join("memory.high")), "7000000");

    fs::write(
        c.join("memory.events"),
        "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
    )
    .unwrap();
    assert_eq!(cg.oom_kill_count(), 1);
    fs::write(c.join("cpu.stat"), "usage_usec 7\nuser_usec 5\n").unwrap();
    fs::write(c.join("memory.current"), "55\n").unwrap();
    assert_eq!(cg.stats().cpu_usage_ns, 7000);
    assert_eq!(cg.stats().memory_usage_bytes, 55);

    cg.remove().unwrap();
    assert!(!c.exists());
    remove_path_at(p, "vmrun").unwrap();
    assert!(!p.join("vmrun").exists());
}

#[test]
fn v2_quota_unlimited() {
    let root = fake_v2_root();
    let r = resources(r#"{"cpu":{"quota":-1}}"#);
    open_at(root.path(), "x", Some(&r)).unwrap();
    assert_eq!(read(root.path().join("x/cpu.max")), "max 100000");
}

#[test]
fn weight_conversions() {
    assert_eq!(v2::shares_to_weight(2), 1);
    assert_eq!(v2::shares_to_weight(1024), 39);
    assert_eq!(v2::shares_to_weight(262_144), 10_000);
    assert_eq!(v2::blkio_weight_to_io(10), 1);
    assert_eq!(v2::blkio_weight_to_io(1000), 10_000);
}

#[test]
fn path_normalization() {
    assert_eq!(normalize("/a/b/").unwrap(), Path::new("a/b"));
    assert_eq!(normalize("a//./b").unwrap(), Path::new("a/b"));
    for bad in ["/", "", "/a/../b", "system.slice:vmrun:x"] {
        let e = normalize(bad).unwrap_err().to_string();
        assert!(e.contains("invalid cgroup path"), "{bad}: {e}");
    }
}

#[test]
fn write_errors_name_the_file() {
    let root = fake_v1_root();
    let cg = open_at(root.path(), "/c", None).unwrap();
    // A directory where the file should be makes the write fail.
    fs::create_dir(root.path().join("pids/c/pids.max")).unwrap();
    let r = resources(r#"{"pids":{"limit":5}}"#);
    let e = cg.apply(&r).unwrap_err().to_string();
    assert!(e.contains("pids/c/pids.max") && e.contains("\"5\""), "{e}");
}
