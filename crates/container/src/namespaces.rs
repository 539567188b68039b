//! `linux.namespaces` -> which namespaces the helper process joins (setns on
//! fds opened up front, so a bad path fails early and by name) and which it
//! creates (one unshare call).

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use nix::sched::CloneFlags;
use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType};

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("user namespaces are not supported")]
    UserNotSupported,
    #[error("{0} namespaces are not supported")]
    NotSupported(String),
    #[error("namespace {0} is listed twice")]
    Duplicate(String),
    #[error("open namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub(crate) struct JoinNs {
    pub fd: OwnedFd,
    pub flag: CloneFlags,
    pub path: PathBuf,
}

#[derive(Debug)]
pub(crate) struct NamespacePlan {
    pub join: Vec<JoinNs>,
    pub unshare: CloneFlags,
}

impl NamespacePlan {
    /// The namespace is private to the container or the pod (new or joined).
    pub(crate) fn has(&self, flag: CloneFlags) -> bool {
        self.unshare.contains(flag) || self.join.iter().any(|j| j.flag == flag)
    }

    pub(crate) fn is_new(&self, flag: CloneFlags) -> bool {
        self.unshare.contains(flag)
    }

    pub(crate) fn is_joined(&self, flag: CloneFlags) -> bool {
        self.join.iter().any(|j| j.flag == flag)
    }
}

pub(crate) fn clone_flag(t: LinuxNamespaceType) -> Result<CloneFlags, NamespaceError> {
    Ok(match t {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::User => return Err(NamespaceError::UserNotSupported),
        LinuxNamespaceType::Time => return Err(NamespaceError::NotSupported("time".into())),
    })
}

/// Opens a namespace file for setns.
pub(crate) fn open_ns(path: PathBuf, flag: CloneFlags) -> Result<JoinNs, NamespaceError> {
    match std::fs::File::open(&path) {
        Ok(f) => Ok(JoinNs {
            fd: f.into(),
            flag,
            path,
        }),
        Err(source) => Err(NamespaceError::Open { path, source }),
    }
}

pub(crate) fn plan(namespaces: &[LinuxNamespace]) -> Result<NamespacePlan, NamespaceError> {
    let mut plan = NamespacePlan {
        join: Vec::new(),
        unshare: CloneFlags::empty(),
    };
    let mut seen = CloneFlags::empty();
    for ns in namespaces {
        let flag = clone_flag(ns.typ())?;
        if seen.contains(flag) {
            return Err(NamespaceError::Duplicate(ns.typ().to_string()));
        }
        seen.insert(flag);
        match ns.path() {
            Some(p) if !p.as_os_str().is_empty() => plan.join.push(open_ns(p.clone(), flag)?),
            _ => plan.unshare.insert(flag),
        }
    }
    // Join the mount namespace last: nothing after it may depend on host paths.
    plan.join.sort_by_key(|j| j.flag == CloneFlags::CLONE_NEWNS);
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(json: &str) -> Vec<LinuxNamespace> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn new_and_joined() {
        let p = plan(&ns(
            r#"[{"type":"pid"},{"type":"network","path":"/proc/self/ns/net"},{"type":"mount"},{"type":"uts"}]"#,
        ))
        .unwrap();
        assert_eq!(
            p.unshare,
            CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS
        );
        assert!(p.is_joined(CloneFlags::CLONE_NEWNET));
        assert!(p.has(CloneFlags::CLONE_NEWNET) && !p.is_new(CloneFlags::CLONE_NEWNET));
        assert!(!p.has(CloneFlags::CLONE_NEWIPC));
    }

    #[test]
    fn errors_are_clear() {
        let e = plan(&ns(r#"[{"type":"user"}]"#)).unwrap_err();
        assert_eq!(e.to_string(), "user namespaces are not supported");
        let e = plan(&ns(r#"[{"type":"ipc"},{"type":"ipc"}]"#)).unwrap_err();
        assert_eq!(e.to_string(), "namespace ipc is listed twice");
        let e = plan(&ns(r#"[{"type":"network","path":"/nonexistent/ns"}]"#)).unwrap_err();
        assert!(
            e.to_string().starts_with("open namespace /nonexistent/ns:"),
            "{e}"
        );
    }
}
