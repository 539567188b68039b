//! Which seccomp profile a container gets: Kubernetes' `seccompProfile`
//! (pod or container securityContext) and CRI's `SecurityProfile`, turned
//! into the OCI spec's `linux.seccomp`.
//!
//! vmrun's RuntimeDefault profile allows every call except those a
//! container without the matching capability has no business making
//! (kernel modules, kexec and reboot, clock setting, raw I/O ports, mounts
//! and namespaces, keyrings, io_uring, userfaultfd, ...), which fail with
//! EPERM; `clone3` fails with ENOSYS so that C libraries fall back to
//! `clone`, whose namespace flags the profile can see. A capability added
//! to the container (`capabilities.add`) lifts the calls it grants, as in
//! Docker's and containerd's default profiles. Unlike theirs it is a deny
//! list: a call newer than the list is allowed.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// Where relative `localhostProfile` paths of `vmrun run` manifests are
/// looked up (kubelet's default seccomp root, as `podman kube play` does).
pub const LOCALHOST_ROOT: &str = "/var/lib/kubelet/seccomp";

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SeccompProfile {
    /// No filter (Kubernetes' default when nothing is set).
    #[default]
    Unconfined,
    RuntimeDefault,
    /// An OCI seccomp profile (JSON) on this host.
    Localhost(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("seccomp profile {path}: {message}")]
    Unreadable { path: String, message: String },
}

/// Calls refused unless the container has the capability.
const GATED: &[(&str, &[&str])] = &[
    (
        "CAP_SYS_ADMIN",
        &[
            "mount",
            "umount",
            "umount2",
            "pivot_root",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "move_mount",
            "open_tree",
            "mount_setattr",
            "setns",
            "unshare",
            "sethostname",
            "setdomainname",
            "quotactl",
            "quotactl_fd",
            "lookup_dcookie",
            "name_to_handle_at",
            "swapon",
            "swapoff",
            "bpf",
            "perf_event_open",
            "fanotify_init",
        ],
    ),
    (
        "CAP_SYS_MODULE",
        &[
            "init_module",
            "finit_module",
            "delete_module",
            "create_module",
            "query_module",
            "get_kernel_syms",
        ],
    ),
    ("CAP_SYS_BOOT", &["reboot", "kexec_load", "kexec_file_load"]),
    (
        "CAP_SYS_TIME",
        &["settimeofday", "clock_settime", "clock_adjtime", "stime"],
    ),
    ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
    ("CAP_SYS_PACCT", &["acct"]),
    ("CAP_SYSLOG", &["syslog"]),
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
];

/// Calls refused whatever the capabilities.
const ALWAYS: &[&str] = &[
    "add_key",
    "request_key",
    "keyctl",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "nfsservctl",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "vm86",
    "vm86old",
];

/// The namespace flags of clone(2): a new namespace needs CAP_SYS_ADMIN.
const CLONE_NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// vmrun's RuntimeDefault profile for a container with `caps_add` added.
pub fn runtime_default(caps_add: &[String]) -> Value {
    let has = |cap: &str| {
        caps_add.iter().any(|c| {
            let c = c.to_ascii_uppercase();
            c == "ALL" || c == cap || format!("CAP_{c}") == cap
        })
    };
    let mut denied: Vec<&str> = ALWAYS.to_vec();
    for (cap, calls) in GATED {
        if !has(cap) {
            denied.extend_from_slice(calls);
        }
    }
    let mut syscalls = vec![
        json!({ "names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM }),
        json!({ "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS }),
    ];
    if !has("CAP_SYS_ADMIN") {
        for flag in CLONE_NAMESPACE_FLAGS {
            syscalls.push(json!({
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": libc::EPERM,
                "args": [{ "index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ" }],
            }));
        }
    }
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": syscalls,
    })
}

/// The `linux.seccomp` of a container, or None for no filter. Privileged
/// containers run unconfined, as with containerd.
pub fn linux_seccomp(
    profile: &SeccompProfile,
    privileged: bool,
    caps_add: &[String],
) -> Result<Option<Value>, ProfileError> {
    if privileged {
        return Ok(None);
    }
    match profile {
        SeccompProfile::Unconfined => Ok(None),
        SeccompProfile::RuntimeDefault => Ok(Some(runtime_default(caps_add))),
        SeccompProfile::Localhost(path) => load(path).map(Some),
    }
}

fn load(path: &Path) -> Result<Value, ProfileError> {
    let unreadable = |message: String| ProfileError::Unreadable {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| unreadable(e.to_string()))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| unreadable(format!("not JSON: {e}")))?;
    // Checked now, so that a bad profile is named here and not deep in
    // container setup.
    let parsed: oci_spec::runtime::LinuxSeccomp = serde_json::from_value(value.clone())
        .map_err(|e| unreadable(format!("not an OCI seccomp profile: {e}")))?;
    vmrun_container::seccomp::compile(&parsed).map_err(|e| unreadable(e.to_string()))?;
    Ok(value)
}

/// A Kubernetes `seccompProfile` (`type`, `localhostProfile`).
pub fn from_kubernetes(kind: &str, localhost: Option<&str>) -> Result<SeccompProfile, String> {
    match kind {
        "Unconfined" => Ok(SeccompProfile::Unconfined),
        "RuntimeDefault" => Ok(SeccompProfile::RuntimeDefault),
        "Localhost" => {
            let rel = localhost
                .filter(|p| !p.is_empty())
                .ok_or("type Localhost needs localhostProfile")?;
            if Path::new(rel).is_absolute() || rel.split('/').any(|c| c == "..") {
                return Err(format!(
                    "localhostProfile {rel:?} must be a relative path inside {LOCALHOST_ROOT}"
                ));
            }
            Ok(SeccompProfile::Localhost(
                Path::new(LOCALHOST_ROOT).join(rel),
            ))
        }
        other => Err(format!(
            "type {other:?} is not one of RuntimeDefault, Unconfined, Localhost"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(profile: &Value) -> Vec<String> {
        profile["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["names"].as_array().unwrap().clone())
            .map(|n| n.as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn the_default_profile_compiles_and_capabilities_lift_their_calls() {
        let plain = runtime_default(&[]);
        let parsed: oci_spec::runtime::LinuxSeccomp =
            serde_json::from_value(plain.clone()).unwrap();
        assert!(!vmrun_container::seccomp::compile(&parsed)
            .unwrap()
            .is_empty());
        assert!(names(&plain).contains(&"mount".to_string()));
        assert!(names(&plain).contains(&"kexec_load".to_string()));
        let admin = runtime_default(&["SYS_ADMIN".into()]);
        assert!(!names(&admin).contains(&"mount".to_string()));
        assert!(names(&admin).contains(&"kexec_load".to_string()));
        assert!(!names(&admin).contains(&"clone".to_string()));
    }

    #[test]
    fn kubernetes_types_and_bad_paths() {
        assert_eq!(
            from_kubernetes("Localhost", Some("profiles/audit.json")).unwrap(),
            SeccompProfile::Localhost(PathBuf::from(LOCALHOST_ROOT).join("profiles/audit.json"))
        );
        assert!(from_kubernetes("Localhost", Some("../etc/x")).is_err());
        assert!(from_kubernetes("Localhost", None).is_err());
        assert!(from_kubernetes("Sometimes", None)
            .unwrap_err()
            .contains("Sometimes"));
        assert_eq!(
            linux_seccomp(&SeccompProfile::RuntimeDefault, true, &[]).unwrap(),
            None
        );
    }

    #[test]
    fn a_bad_localhost_profile_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(&path, r#"{"defaultAction": "SCMP_ACT_SOMETIMES"}"#).unwrap();
        let e = linux_seccomp(&SeccompProfile::Localhost(path.clone()), false, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.json") && e.contains("OCI seccomp"), "{e}");
        let e = linux_seccomp(
            &SeccompProfile::Localhost(dir.path().join("none.json")),
            false,
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("none.json"), "{e}");
    }
}
