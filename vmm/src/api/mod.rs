//! The control API: line-delimited JSON over a unix socket.
//!
//! [`server`] only parses and validates requests into typed [`VmmAction`]s
//! and sends them to the one thread that owns the VM (the one in
//! [`crate::vm::MicroVm::run`]), which answers each with an
//! [`ActionReply`]. Requests, one JSON object per line:
//! `{"action":"status"}`, `{"action":"pause"}`, `{"action":"resume"}`,
//! `{"action":"shutdown","graceful_timeout_ms":N}` (wait up to N ms for the
//! guest to power off by itself, then stop it), `{"action":"stop"}` and
//! `{"action":"attach_disk","path":"/img","read_only":true}` (fills the
//! first empty spare disk slot; the reply names the guest's disk index:
//! 0 is vda; an fd sent with the line (SCM_RIGHTS) is the disk, else the
//! VMM opens the path, which a jailed VMM cannot). A test hook,
//! `{"action":"test_forbidden_syscall"}`, makes the API thread call what
//! its seccomp filter forbids.

pub mod server;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;

use serde::{Deserialize, Serialize};

use crate::devices::virtio::balloon::BalloonStats;

/// What the host asks of the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmAction {
    Status,
    Pause,
    Resume,
    Shutdown {
        graceful_timeout_ms: u64,
    },
    Stop,
    /// `file`: the disk opened by the host and passed with the request
    /// (SCM_RIGHTS), which a jailed VMM needs; without one the VMM opens
    /// `path` itself.
    AttachDisk {
        path: PathBuf,
        read_only: bool,
        file: Option<PassedFile>,
    },
    /// A test hook: the API thread makes a system call its seccomp filter
    /// forbids, which ends the VMM (the tests check the filter is there).
    /// Nothing it does needs more than the control socket already allows.
    TestForbiddenSyscall,
}

/// A file descriptor that came with a request.
#[derive(Clone, Debug)]
pub struct PassedFile(pub std::sync::Arc<std::fs::File>);

impl PartialEq for PassedFile {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for PassedFile {}

/// A request line as sent. Parsed into this flat shape first because
/// serde's internally tagged enums accept unknown fields on unit variants
/// (`{"action":"stop","now":true}` would stop the VM).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    action: String,
    graceful_timeout_ms: Option<u64>,
    path: Option<PathBuf>,
    read_only: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
}

/// The balloon's part of a status report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BalloonStatus {
    /// Guest memory handed back to the host so far (free page reports
    /// and inflation), in bytes.
    pub discarded_bytes: u64,
    /// Ranges the guest reported that were not whole pages of guest memory.
    pub rejected_ranges: u64,
}

impl From<&BalloonStats> for BalloonStatus {
    fn from(stats: &BalloonStats) -> Self {
        BalloonStatus {
            discarded_bytes: stats.discarded_bytes.load(Ordering::Relaxed),
            rejected_ranges: stats.rejected_ranges.load(Ordering::Relaxed),
        }
    }
}

/// The owner's answer, sent back as one JSON line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ActionReply {
    Status {
        ok: bool,
        state: RunState,
        vcpus: u8,
        memory_mib: u64,
        uptime_ms: u64,
        /// With a balloon device: what the guest gave back.
        #[serde(skip_serializing_if = "Option::is_none")]
        balloon: Option<BalloonStatus>,
    },
    /// `attach_disk`: the guest's index of the disk (0 is vda).
    Attached {
        ok: bool,
        disk: usize,
    },
    Done {
        ok: bool,
        /// What happened, for `shutdown`: "guest stopped" or "forced".
        #[serde(skip_serializing_if = "Option::is_none")]
        outcome: Option<&'static str>,
    },
    Error {
        ok: bool,
        error: String,
    },
}

impl ActionReply {
    pub fn done() -> Self {
        ActionReply::Done {
            ok: true,
            outcome: None,
        }
    }

    pub fn error(error: impl Into<String>) -> Self {
        ActionReply::Error {
            ok: false,
            error: error.into(),
        }
    }
}

/// What wakes the VM's owner thread.
pub enum OwnerEvent {
    /// A stop was requested (by the guest, a device or the API).
    Stopped,
    Action(ActionRequest),
}

/// An action on its way to the owner, with where to send the answer.
pub struct ActionRequest {
    pub action: VmmAction,
    pub reply: Sender<ActionReply>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("request is not valid JSON for a known action: {0}")]
    Invalid(String),
    #[error("unknown action {0:?} (status, pause, resume, shutdown, stop, attach_disk) is not a known action")]
    UnknownAction(String),
    #[error("graceful_timeout_ms is only valid for shutdown, which is a known action")]
    UnexpectedTimeout,
    #[error("path and read_only are only valid for attach_disk")]
    UnexpectedDisk,
    #[error("attach_disk needs an absolute path")]
    DiskPath,
}

/// Parses one request line.
pub fn parse_request(line: &str) -> Result<VmmAction, ParseError> {
    let raw: RawRequest =
        serde_json::from_str(line).map_err(|e| ParseError::Invalid(e.to_string()))?;
    if raw.action == "attach_disk" {
        if raw.graceful_timeout_ms.is_some() {
            return Err(ParseError::UnexpectedTimeout);
        }
        return match raw.path {
            Some(path) if path.is_absolute() => Ok(VmmAction::AttachDisk {
                path,
                read_only: raw.read_only.unwrap_or(false),
                file: None,
            }),
            _ => Err(ParseError::DiskPath),
        };
    }
    if raw.path.is_some() || raw.read_only.is_some() {
        return Err(ParseError::UnexpectedDisk);
    }
    let action = match raw.action.as_str() {
        "status" => VmmAction::Status,
        "pause" => VmmAction::Pause,
        "resume" => VmmAction::Resume,
        "stop" => VmmAction::Stop,
        "test_forbidden_syscall" => VmmAction::TestForbiddenSyscall,
        "shutdown" => {
            return Ok(VmmAction::Shutdown {
                graceful_timeout_ms: raw.graceful_timeout_ms.unwrap_or(0),
            })
        }
        _ => return Err(ParseError::UnknownAction(raw.action)),
    };
    match raw.graceful_timeout_ms {
        Some(_) => Err(ParseError::UnexpectedTimeout),
        None => Ok(action),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_into_typed_actions() {
        assert_eq!(
            parse_request(r#"{"action":"status"}"#),
            Ok(VmmAction::Status)
        );
        assert_eq!(
            parse_request(r#"{"action":"shutdown","graceful_timeout_ms":500}"#),
            Ok(VmmAction::Shutdown {
                graceful_timeout_ms: 500
            })
        );
        assert_eq!(
            parse_request(r#"{"action":"shutdown"}"#),
            Ok(VmmAction::Shutdown {
                graceful_timeout_ms: 0
            })
        );
        assert_eq!(
            parse_request(r#"{"action":"attach_disk","path":"/a/b.erofs","read_only":true}"#),
            Ok(VmmAction::AttachDisk {
                path: "/a/b.erofs".into(),
                read_only: true,
                file: None,
            })
        );
        for bad in [
            r#"{"action":"attach_disk"}"#,
            r#"{"action":"attach_disk","path":"rel.img"}"#,
            r#"{"action":"attach_disk","path":"/a","graceful_timeout_ms":1}"#,
            r#"{"action":"status","path":"/a"}"#,
            r#"{"action":"stop","read_only":true}"#,
            r#"{"action":"reboot"}"#,
            r#"{"action":"stop","force":true}"#,
            r#"{"action":"stop","graceful_timeout_ms":5}"#,
            r#"{"action":"shutdown","graceful_timeout_ms":-1}"#,
            "status",
            "",
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_serialize_flat() {
        let status = ActionReply::Status {
            ok: true,
            state: RunState::Paused,
            vcpus: 2,
            memory_mib: 128,
            uptime_ms: 5,
            balloon: None,
        };
        assert_eq!(
            serde_json::to_string(&status).unwrap(),
            r#"{"ok":true,"state":"paused","vcpus":2,"memory_mib":128,"uptime_ms":5}"#
        );
        let with_balloon = ActionReply::Status {
            ok: true,
            state: RunState::Running,
            vcpus: 1,
            memory_mib: 256,
            uptime_ms: 7,
            balloon: Some(BalloonStatus {
                discarded_bytes: 4 << 20,
                rejected_ranges: 0,
            }),
        };
        assert_eq!(
            serde_json::to_string(&with_balloon).unwrap(),
            r#"{"ok":true,"state":"running","vcpus":1,"memory_mib":256,"uptime_ms":7,"balloon":{"discarded_bytes":4194304,"rejected_ranges":0}}"#
        );
        assert_eq!(
            serde_json::to_string(&ActionReply::error("x")).unwrap(),
            r#"{"ok":false,"error":"x"}"#
        );
    }
}
