//! Spec -> mount sequence, with the recording fake.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::SFlag;
use oci_spec::runtime::Spec;

use super::*;
use crate::container::Rootfs;
use crate::namespaces;
use crate::syscall::recording::{Op, RecordingSyscall};

fn spec(json: &str) -> Spec {
    serde_json::from_str(json).expect("valid spec json")
}

const SPEC: &str = r#"{
  "ociVersion": "1.0.2",
  "root": {"path": "rootfs", "readonly": true},
  "hostname": "web",
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid","strictatime","mode=755","size=65536k"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid","noexec","nodev","mode=1777","size=65536k"]},
    {"destination": "/escape/etc/hosts", "type": "bind", "source": "/etc/hosts", "options": ["rbind","ro","rprivate"]}
  ],
  "linux": {
    "namespaces": [{"type":"mount"},{"type":"uts"},{"type":"pid"},{"type":"ipc"}],
    "sysctl": {"kernel.shmmax": "1000000"},
    "maskedPaths": ["/proc/version", "/proc/self", "/proc/does-not-exist"],
    "readonlyPaths": ["/proc/sys"]
  }
}"#;

fn plan_for(spec_json: &str, root: &Path) -> Result<RootfsPlan, String> {
    let s = spec(spec_json);
    let ns =
        namespaces::plan(s.linux().as_ref().unwrap().namespaces().as_deref().unwrap()).unwrap();
    plan(
        &s,
        &Rootfs::Dir(root.to_path_buf()),
        root.to_path_buf(),
        &ns,
    )
}

fn mount(
    source: Option<&str>,
    target: impl Into<PathBuf>,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Op {
    Op::Mount {
        source: source.map(PathBuf::from),
        target: target.into(),
        fstype: fstype.map(str::to_string),
        flags,
        data: data.map(str::to_string),
    }
}

#[test]
fn mount_sequence() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    // A hostile image: /escape points at the host's root.
    std::os::unix::fs::symlink("/../../..", root.join("escape")).unwrap();
    let plan = plan_for(SPEC, root).unwrap();
    assert!(plan.setup_dev);
    assert_eq!(plan.hostname.as_deref(), Some("web"));
    let sys = RecordingSyscall::new();
    prepare(&plan, &sys).unwrap();
    finalize(&plan, &sys).unwrap();
    let ops = sys.ops();

    let expected_prefix = vec![
        mount(None, "/", None, MsFlags::MS_PRIVATE | MsFlags::MS_REC, None),
        mount(
            Some(root.to_str().unwrap()),
            root,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        ),
        Op::MkdirAll(root.join("proc")),
        mount(
            Some("proc"),
            root.join("proc"),
            Some("proc"),
            MsFlags::empty(),
            None,
        ),
        Op::MkdirAll(root.join("dev")),
        mount(
            Some("tmpfs"),
            root.join("dev"),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
            Some("mode=755,size=65536k"),
        ),
        Op::MkdirAll(root.join("dev/shm")),
        mount(
            Some("shm"),
            root.join("dev/shm"),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV,
            Some("mode=1777,size=65536k"),
        ),
        // The symlink was resolved inside the rootfs, not on the host.
        Op::MkdirAll(root.join("etc")),
        Op::CreateFile(root.join("etc/hosts")),
        mount(
            Some("/etc/hosts"),
            root.join("etc/hosts"),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        ),
        mount(
            None,
            root.join("etc/hosts"),
            None,
            MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
            None,
        ),
        mount(
            None,
            root.join("etc/hosts"),
            None,
            MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            None,
        ),
        Op::MkdirAll(root.join("dev")),
        Op::Mknod(
            root.join("dev/null"),
            SFlag::S_IFCHR,
            0o666,
            nix::sys::stat::makedev(1, 3),
        ),
    ];
    assert_eq!(
        ops[..expected_prefix.len()],
        expected_prefix[..],
        "{ops:#?}"
    );

    let pos = |op: &Op| {
        ops.iter()
            .position(|o| o == op)
            .unwrap_or_else(|| panic!("missing {op:?} in {ops:#?}"))
    };
    let tty = pos(&Op::Mknod(
        root.join("dev/tty"),
        SFlag::S_IFCHR,
        0o666,
        nix::sys::stat::makedev(5, 0),
    ));
    let ptmx = pos(&Op::Symlink("pts/ptmx".into(), root.join("dev/ptmx")));
    let fd = pos(&Op::Symlink("/proc/self/fd".into(), root.join("dev/fd")));
    let chdir = pos(&Op::Chdir(root.to_path_buf()));
    let pivot = pos(&Op::PivotRoot(".".into(), ".".into()));
    let detach = pos(&Op::Umount2(".".into(), MntFlags::MNT_DETACH));
    let host = pos(&Op::Sethostname("web".into()));
    let sysctl = pos(&Op::WriteFile(
        "/proc/sys/kernel/shmmax".into(),
        b"1000000".to_vec(),
    ));
    let ro_sys = pos(&mount(
        Some("/proc/sys"),
        "/proc/sys",
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    ));
    let ro_sys2 = pos(&mount(
        None,
        "/proc/sys",
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None,
    ));
    let mask_file = pos(&mount(
        Some("/dev/null"),
        "/proc/version",
        None,
        MsFlags::MS_BIND,
        None,
    ));
    let mask_dir = pos(&mount(
        Some("tmpfs"),
        "/proc/self",
        Some("tmpfs"),
        MsFlags::MS_RDONLY,
        None,
    ));
    let ro_root = pos(&mount(
        None,
        "/",
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None,
    ));
    let order = [
        tty, fd, ptmx, chdir, pivot, detach, host, sysctl, ro_sys, ro_sys2, mask_file, mask_dir,
        ro_root,
    ];
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "wrong order {order:?} in {ops:#?}"
    );
    // Missing masked paths are skipped.
    assert!(!ops
        .iter()
        .any(|o| format!("{o:?}").contains("does-not-exist")));
}

#[test]
fn mount_failure_names_the_destination() {
    let t = tempfile::tempdir().unwrap();
    let plan = plan_for(SPEC, t.path()).unwrap();
    let sys = RecordingSyscall::failing_on("Some(\"shm\")");
    let e = prepare(&plan, &sys).unwrap_err().to_string();
    assert_eq!(
        e,
        "mount \"shm\" on \"/dev/shm\" (type tmpfs): operation not permitted"
    );
    // Nothing after the failing mount ran.
    assert!(!sys.ops().iter().any(|o| matches!(o, Op::PivotRoot(..))));
}

#[test]
fn sysctl_failure_names_the_key() {
    let t = tempfile::tempdir().unwrap();
    let plan = plan_for(SPEC, t.path()).unwrap();
    let sys = RecordingSyscall::failing_on("shmmax");
    let e = finalize(&plan, &sys).unwrap_err().to_string();
    assert_eq!(
        e,
        "sysctl \"kernel.shmmax\"=\"1000000\": write /proc/sys/kernel/shmmax: operation not permitted"
    );
}

#[test]
fn sysctl_validation() {
    let t = tempfile::tempdir().unwrap();
    let bad = SPEC.replace("kernel.shmmax", "vm.swappiness");
    let e = plan_for(&bad, t.path()).unwrap_err();
    assert!(
        e.contains("\"vm.swappiness\" is not in a separate kernel namespace"),
        "{e}"
    );
    let no_net = SPEC.replace("kernel.shmmax", "net.ipv4.ip_forward");
    let e = plan_for(&no_net, t.path()).unwrap_err();
    assert!(e.contains("own network namespace"), "{e}");
    let traversal = SPEC.replace("kernel.shmmax", "net/../../x");
    assert!(plan_for(&traversal, t.path())
        .unwrap_err()
        .contains("invalid key"));
}

#[test]
fn plan_rejects_bad_specs() {
    let t = tempfile::tempdir().unwrap();
    let rel = SPEC.replace("\"destination\": \"/proc\"", "\"destination\": \"proc\"");
    assert!(plan_for(&rel, t.path())
        .unwrap_err()
        .contains("must be an absolute path"));
    let no_uts = SPEC.replace("{\"type\":\"uts\"},", "");
    assert!(plan_for(&no_uts, t.path())
        .unwrap_err()
        .contains("no UTS namespace"));
}

#[test]
fn overlay_options() {
    let l = |s: &str| PathBuf::from(s);
    assert_eq!(
        overlay_data(
            &[l("/l/bottom"), l("/l/top")],
            Path::new("/u"),
            Path::new("/w")
        )
        .unwrap(),
        "lowerdir=/l/top:/l/bottom,upperdir=/u,workdir=/w"
    );
    assert!(overlay_data(&[], Path::new("/u"), Path::new("/w")).is_err());
    assert!(overlay_data(&[l("/a:b")], Path::new("/u"), Path::new("/w")).is_err());
    let many: Vec<PathBuf> = (0..200)
        .map(|i| PathBuf::from(format!("/var/lib/vmrun/layers/{i:040}")))
        .collect();
    let e = overlay_data(&many, Path::new("/u"), Path::new("/w")).unwrap_err();
    assert!(e.contains("4095"), "{e}");
}

#[test]
fn overlay_root_is_mounted_inside_the_namespace() {
    let t = tempfile::tempdir().unwrap();
    let s = spec(SPEC);
    let ns =
        namespaces::plan(s.linux().as_ref().unwrap().namespaces().as_deref().unwrap()).unwrap();
    let rootfs = Rootfs::Overlay {
        lower: vec!["/layers/a".into(), "/layers/b".into()],
        upper: "/c/upper".into(),
        work: "/c/work".into(),
    };
    let p = plan(&s, &rootfs, t.path().to_path_buf(), &ns).unwrap();
    let sys = RecordingSyscall::new();
    prepare(&p, &sys).unwrap();
    assert_eq!(
        sys.ops()[1],
        mount(
            Some("overlay"),
            t.path(),
            Some("overlay"),
            MsFlags::empty(),
            Some("lowerdir=/layers/b:/layers/a,upperdir=/c/upper,workdir=/c/work")
        )
    );
}

#[test]
fn mountinfo_fields_are_unescaped() {
    assert_eq!(super::unescape_mount_field(r"/a\040b\134c"), r"/a b\c");
    assert_eq!(super::unescape_mount_field(r"/plain\09"), r"/plain\09");
}

#[test]
fn the_mount_holding_a_path_is_the_longest_mount_point_above_it() {
    assert_eq!(
        super::mount_point_of(std::path::Path::new("/proc/self/status")).unwrap(),
        std::path::PathBuf::from("/proc")
    );
}
