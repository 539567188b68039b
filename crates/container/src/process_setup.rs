//! `process` from the spec: planned in the parent (all parsing and
//! validation), applied in the child (rlimits, cwd, ids, capabilities,
//! no_new_privs, umask) and finally exec'd.

use std::collections::HashSet;
use std::ffi::CString;
use std::path::{Path, PathBuf};

use caps::Capability;
use oci_spec::runtime::{Capabilities, PosixRlimitType, Process};

use crate::path_lookup::{errno_text, find_executable};
use crate::rootfs::SetupError;
use crate::syscall::{ProcessCapabilities, Syscall};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rlimit {
    pub name: String,
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct ProcessPlan {
    pub arg0: String,
    pub args: Vec<CString>,
    pub env: Vec<CString>,
    pub path_env: Option<String>,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: u32,
    pub bounding: Option<HashSet<Capability>>,
    pub caps: Option<ProcessCapabilities>,
    pub no_new_privileges: bool,
    pub rlimits: Vec<Rlimit>,
    pub oom_score_adj: Option<i32>,
    /// `process.terminal`: the process makes its stdin (a pty slave the
    /// caller passes, see `terminal.rs`) its controlling terminal.
    pub terminal: bool,
    /// `linux.seccomp`, compiled; installed last before exec (or before
    /// the user switch when no_new_privs is off, while the process still
    /// has CAP_SYS_ADMIN, as runc does).
    pub seccomp: Vec<seccompiler::BpfProgram>,
}

fn cstring(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} {s:?} contains a NUL byte"))
}

/// oci-spec names capabilities "AUDIT_CONTROL"; the caps crate parses
/// "CAP_AUDIT_CONTROL".
pub(crate) fn convert_caps(set: Option<&Capabilities>) -> Result<HashSet<Capability>, String> {
    set.into_iter()
        .flatten()
        .map(|c| {
            let name = format!("CAP_{c}");
            name.parse::<Capability>()
                .map_err(|_| format!("unknown capability {name}"))
        })
        .collect()
}

// The RLIMIT_* constants are u32 on glibc but c_int on musl (the guest).
#[allow(clippy::unnecessary_cast)]
fn rlimit_resource(t: PosixRlimitType) -> u32 {
    (match t {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }) as u32
}

pub(crate) fn plan(p: &Process) -> Result<ProcessPlan, String> {
    let args = p.args().clone().unwrap_or_default();
    let Some(arg0) = args.first().cloned() else {
        return Err("process.args must not be empty".into());
    };
    let args = args
        .iter()
        .map(|a| cstring("process.args entry", a))
        .collect::<Result<Vec<_>, _>>()?;
    let env_strs = p.env().clone().unwrap_or_default();
    let env = env_strs
        .iter()
        .map(|e| cstring("process.env entry", e))
        .collect::<Result<Vec<_>, _>>()?;
    let path_env = env_strs
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH=").map(str::to_string));
    let cwd = p.cwd().clone();
    if !cwd.is_absolute() {
        return Err(format!("process.cwd {cwd:?} must be an absolute path"));
    }
    let (bounding, caps) = match p.capabilities() {
        None => (None, None),
        Some(c) => (
            Some(convert_caps(c.bounding().as_ref())?),
            Some(ProcessCapabilities {
                effective: convert_caps(c.effective().as_ref())?,
                permitted: convert_caps(c.permitted().as_ref())?,
                inheritable: convert_caps(c.inheritable().as_ref())?,
                ambient: convert_caps(c.ambient().as_ref())?,
            }),
        ),
    };
    let rlimits = p
        .rlimits()
        .iter()
        .flatten()
        .map(|r| Rlimit {
            name: serde_json::to_value(r.typ())
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            resource: rlimit_resource(r.typ()),
            soft: r.soft(),
            hard: r.hard(),
        })
        .collect();
    let user = p.user();
    Ok(ProcessPlan {
        arg0,
        args,
        env,
        path_env,
        cwd,
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        umask: user.umask().unwrap_or(0o022),
        bounding,
        caps,
        no_new_privileges: p.no_new_privileges().unwrap_or(false),
        rlimits,
        oom_score_adj: p.oom_score_adj(),
        terminal: p.terminal() == Some(true),
        seccomp: Vec::new(),
    })
}

fn fail(what: String, e: std::io::Error) -> SetupError {
    SetupError(format!("{what}: {}", errno_text(&e)))
}

/// Applies everything up to (not including) exec. `create_cwd`: the
/// container init creates a missing cwd like runc does; `exec` does not.
pub(crate) fn apply(
    plan: &ProcessPlan,
    sys: &dyn Syscall,
    create_cwd: bool,
) -> Result<(), SetupError> {
    for r in &plan.rlimits {
        sys.setrlimit(r.resource, r.soft, r.hard).map_err(|e| {
            fail(
                format!("setrlimit {} (soft {}, hard {})", r.name, r.soft, r.hard),
                e,
            )
        })?;
    }
    if create_cwd {
        sys.mkdir_all(&plan.cwd, 0o755)
            .map_err(|e| fail(format!("create cwd {}", plan.cwd.display()), e))?;
    }
    sys.chdir(&plan.cwd)
        .map_err(|e| fail(format!("chdir to cwd {}", plan.cwd.display()), e))?;
    if let Some(b) = &plan.bounding {
        sys.drop_bounding_capabilities(b)
            .map_err(|e| fail("drop bounding capabilities".into(), e))?;
    }
    if plan.caps.is_some() {
        // Keep the permitted set across the uid change; the wanted sets are
        // installed right after.
        sys.set_keep_caps(true)
            .map_err(|e| fail("prctl(PR_SET_KEEPCAPS)".into(), e))?;
    }
    if !plan.no_new_privileges {
        install_seccomp(plan, sys)?;
    }
    sys.setgroups(&plan.additional_gids)
        .map_err(|e| fail(format!("setgroups {:?}", plan.additional_gids), e))?;
    sys.setgid(plan.gid)
        .map_err(|e| fail(format!("setgid {}", plan.gid), e))?;
    sys.setuid(plan.uid)
        .map_err(|e| fail(format!("setuid {}", plan.uid), e))?;
    if let Some(c) = &plan.caps {
        sys.set_keep_caps(false)
            .map_err(|e| fail("prctl(PR_SET_KEEPCAPS)".into(), e))?;
        sys.set_capabilities(c)
            .map_err(|e| fail("set capabilities".into(), e))?;
    }
    if plan.no_new_privileges {
        sys.set_no_new_privs()
            .map_err(|e| fail("prctl(PR_SET_NO_NEW_PRIVS)".into(), e))?;
    }
    sys.umask(plan.umask);
    Ok(())
}

fn install_seccomp(plan: &ProcessPlan, sys: &dyn Syscall) -> Result<(), SetupError> {
    for filter in &plan.seccomp {
        sys.set_seccomp_filter(filter)
            .map_err(|e| fail("install the seccomp filter (linux.seccomp)".into(), e))?;
    }
    Ok(())
}

/// The home directory of `uid` from the container's /etc/passwd.
fn home_from_passwd(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[2].parse() == Ok(uid)).then(|| f[5].to_string())
    })
}

/// Looks up args[0] and execs it; only returns on failure. Runs inside the
/// container's root, after the user switch.
pub(crate) fn exec(plan: &ProcessPlan, sys: &dyn Syscall) -> SetupError {
    let path = match find_executable(&plan.arg0, plan.path_env.as_deref()) {
        Ok(p) => p,
        Err(msg) => return SetupError(msg),
    };
    let Ok(cpath) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return SetupError(format!("exec {:?}: path contains NUL", plan.arg0));
    };
    // Like runc: HOME from the image's /etc/passwd ("/" if unknown) unless
    // the spec sets it.
    let mut env = plan.env.clone();
    if !env.iter().any(|e| e.as_bytes().starts_with(b"HOME=")) {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let home = home_from_passwd(&passwd, plan.uid).unwrap_or_else(|| "/".into());
        if let Ok(h) = CString::new(format!("HOME={home}")) {
            env.push(h);
        }
    }
    // The last step: from here the process makes only the calls the
    // profile allows, execve among them.
    if plan.no_new_privileges {
        if let Err(e) = install_seccomp(plan, sys) {
            return e;
        }
    }
    let err = nix::unistd::execve(&cpath, &plan.args, &env).unwrap_err();
    SetupError(format!(
        "exec {:?}: {}",
        plan.arg0,
        errno_text(&std::io::Error::from(err))
    ))
}

/// Writes /proc/<pid>/oom_score_adj from the parent (before the process
/// execs). Lowering the score needs CAP_SYS_RESOURCE; say so instead of
/// leaving the user with a bare EACCES.
pub(crate) fn write_oom_score_adj(sys: &dyn Syscall, pid: i32, value: i32) -> Result<(), String> {
    let path = Path::new("/proc")
        .join(pid.to_string())
        .join("oom_score_adj");
    sys.write_file(&path, value.to_string().as_bytes())
        .map_err(|e| {
            let hint = if value < 0
                && matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM))
            {
                " (lowering oom_score_adj requires CAP_SYS_RESOURCE)"
            } else {
                ""
            };
            format!(
                "set oom_score_adj {value}: write {}: {}{hint}",
                path.display(),
                errno_text(&e)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::recording::{Op, RecordingSyscall};

    fn process(json: &str) -> Process {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn home_lookup() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1000::/home/web:/bin/sh\nbad\n";
        assert_eq!(home_from_passwd(passwd, 0).as_deref(), Some("/root"));
        assert_eq!(home_from_passwd(passwd, 1000).as_deref(), Some("/home/web"));
        assert_eq!(home_from_passwd(passwd, 5), None);
    }

    #[test]
    fn caps_convert() {
        let set: Capabilities = [
            oci_spec::runtime::Capability::NetBindService,
            oci_spec::runtime::Capability::Chown,
        ]
        .into_iter()
        .collect();
        let c = convert_caps(Some(&set)).unwrap();
        assert!(c.contains(&Capability::CAP_NET_BIND_SERVICE));
        assert!(c.contains(&Capability::CAP_CHOWN));
        assert_eq!(c.len(), 2);
    }

    #[test]
    #[allow(clippy::unnecessary_cast)]
    fn apply_order() {
        let p = process(
            r#"{"user":{"uid":1000,"gid":1001,"additionalGids":[5],"umask":63},
                "args":["sh","-c","true"],"env":["PATH=/bin","A=1"],"cwd":"/work",
                "capabilities":{"bounding":["CAP_KILL"],"effective":["CAP_KILL"],"permitted":["CAP_KILL"]},
                "rlimits":[{"type":"RLIMIT_NOFILE","soft":100,"hard":200}],
                "noNewPrivileges":true,"oomScoreAdj":5}"#,
        );
        let plan = plan(&p).unwrap();
        assert_eq!(plan.path_env.as_deref(), Some("/bin"));
        assert_eq!(plan.oom_score_adj, Some(5));
        let sys = RecordingSyscall::new();
        apply(&plan, &sys, true).unwrap();
        let kill: HashSet<Capability> = [Capability::CAP_KILL].into_iter().collect();
        assert_eq!(
            sys.ops(),
            vec![
                Op::Setrlimit(libc::RLIMIT_NOFILE as u32, 100, 200),
                Op::MkdirAll("/work".into()),
                Op::Chdir("/work".into()),
                Op::DropBounding(vec!["CAP_KILL".into()]),
                Op::KeepCaps(true),
                Op::Setgroups(vec![5]),
                Op::Setgid(1001),
                Op::Setuid(1000),
                Op::KeepCaps(false),
                Op::SetCapabilities(ProcessCapabilities {
                    effective: kill.clone(),
                    permitted: kill,
                    inheritable: HashSet::new(),
                    ambient: HashSet::new(),
                }),
                Op::NoNewPrivs,
                Op::Umask(63),
            ]
        );
    }

    #[test]
    fn errors_name_the_operation() {
        let p = process(r#"{"user":{"uid":7,"gid":7},"args":["x"],"cwd":"/"}"#);
        let plan = plan(&p).unwrap();
        let sys = RecordingSyscall::failing_on("Setuid");
        let e = apply(&plan, &sys, false).unwrap_err();
        assert_eq!(e.to_string(), "setuid 7: operation not permitted");
    }

    #[test]
    fn invalid_process() {
        let e = plan(&process(
            r#"{"user":{"uid":0,"gid":0},"args":[],"cwd":"/"}"#,
        ))
        .unwrap_err();
        assert_eq!(e, "process.args must not be empty");
        let e = plan(&process(
            r#"{"user":{"uid":0,"gid":0},"args":["a"],"cwd":"rel"}"#,
        ))
        .unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        // A terminal is planned; whether the caller passed one is checked
        // against the stdio (terminal.rs).
        let p = plan(&process(
            r#"{"terminal":true,"user":{"uid":0,"gid":0},"args":["a"],"cwd":"/"}"#,
        ))
        .unwrap();
        assert!(p.terminal);
    }

    #[test]
    fn oom_score_adj_error_explains_missing_capability() {
        let sys = RecordingSyscall::failing_on("oom_score_adj");
        let e = write_oom_score_adj(&sys, 42, -998).unwrap_err();
        assert_eq!(
            e,
            "set oom_score_adj -998: write /proc/42/oom_score_adj: operation not permitted \
             (lowering oom_score_adj requires CAP_SYS_RESOURCE)"
        );
    }
}
