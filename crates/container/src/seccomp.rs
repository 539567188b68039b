//! `linux.seccomp` of an OCI spec as BPF programs, compiled with
//! seccompiler before the container process is forked and installed as the
//! last step before exec.
//!
//! seccompiler's filters have one action for all their rules, OCI profiles
//! one per rule. A profile becomes a stack of filters: first the default
//! filter (the profile's default action for every call no rule matches),
//! then one filter per other action, returning it for its rules' calls and
//! allowing the rest. The kernel runs every filter and takes the most
//! restrictive answer, so a call a rule matches gets that rule's action,
//! and any other call the default.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, OnceLock};

use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompOperator, LinuxSyscall,
};
use seccompiler::{BpfProgram, TargetArch};
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("linux.seccomp: action {0:?} is not supported (no seccomp agent here)")]
    UnsupportedAction(LinuxSeccompAction),
    #[error("linux.seccomp: syscall {name:?}: argument index {index} is out of range (0-5)")]
    ArgIndex { name: String, index: usize },
    #[error("linux.seccomp: syscall {name:?}: SCMP_CMP_MASKED_EQ needs valueTwo")]
    MaskedEqWithoutValue { name: String },
    #[error("linux.seccomp: compiling the filter: {0}")]
    Compile(String),
    #[error("linux.seccomp: this CPU architecture has no seccomp support here")]
    UnsupportedArch,
}

/// The filters to install, in order; empty when the profile allows all.
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>, SeccompError> {
    let arch = target_arch()?;
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    // Rules grouped by their action (as seccompiler JSON), in a stable order.
    let mut by_action: BTreeMap<String, (Value, Vec<Value>)> = BTreeMap::new();
    let mut all_rules = Vec::new();
    for syscall in profile.syscalls().iter().flatten() {
        let act = action(syscall.action(), syscall.errno_ret())?;
        if act == default {
            continue;
        }
        let rules = rules_of(syscall, arch)?;
        all_rules.extend(rules.iter().cloned());
        by_action
            .entry(act.to_string())
            .or_insert_with(|| (act.clone(), Vec::new()))
            .1
            .extend(rules);
    }
    let mut filters = Vec::new();
    if default != json!("allow") {
        // Every call some rule names passes this one; its rule's filter
        // below then gives that rule's action.
        filters.push(filter(default, json!("allow"), all_rules, arch)?);
    }
    // Allowed calls passed the default filter already.
    for (_, (act, rules)) in by_action
        .into_iter()
        .filter(|(_, (a, rules))| a != "allow" && !rules.is_empty())
    {
        filters.push(filter(json!("allow"), act, rules, arch)?);
    }
    Ok(filters)
}

fn target_arch() -> Result<TargetArch, SeccompError> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else {
        Err(SeccompError::UnsupportedArch)
    }
}

/// An OCI action as seccompiler JSON names it.
fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<Value, SeccompError> {
    Ok(match a {
        LinuxSeccompAction::ScmpActAllow => json!("allow"),
        LinuxSeccompAction::ScmpActErrno => json!({ "errno": errno.unwrap_or(libc::EPERM as u32) }),
        // libseccomp's SCMP_ACT_KILL is the thread kill.
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            json!("kill_thread")
        }
        LinuxSeccompAction::ScmpActKillProcess => json!("kill_process"),
        LinuxSeccompAction::ScmpActTrap => json!("trap"),
        LinuxSeccompAction::ScmpActLog => json!("log"),
        LinuxSeccompAction::ScmpActTrace => json!({ "trace": errno.unwrap_or(0) }),
        LinuxSeccompAction::ScmpActNotify => return Err(SeccompError::UnsupportedAction(a)),
    })
}

/// One seccompiler rule per syscall name this architecture has. Names it
/// does not have are left out, as runc does, since profiles list the calls
/// of every architecture.
fn rules_of(syscall: &LinuxSyscall, arch: TargetArch) -> Result<Vec<Value>, SeccompError> {
    let mut rules = Vec::new();
    for name in syscall.names() {
        if !known(name, arch) {
            continue;
        }
        let mut rule = json!({ "syscall": name });
        if let Some(args) = syscall.args().as_ref().filter(|a| !a.is_empty()) {
            let conditions = args
                .iter()
                .map(|a| condition(name, a))
                .collect::<Result<Vec<_>, _>>()?;
            rule["args"] = Value::Array(conditions);
        }
        rules.push(rule);
    }
    Ok(rules)
}

/// Whether seccompiler's table for `arch` has `name`. seccompiler keeps
/// its table private, so a one-rule filter is compiled to find out; the
/// answer is kept, as every container start of a process asks about the
/// same names again (`arch` is the process's own, so names are the key).
fn known(name: &str, arch: TargetArch) -> bool {
    static KNOWN: OnceLock<Mutex<HashMap<String, bool>>> = OnceLock::new();
    let cache = KNOWN.get_or_init(Mutex::default);
    if let Some(&known) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
        return known;
    }
    let probe = json!({ "probe": {
        "mismatch_action": "allow",
        "match_action": "log",
        "filter": [{ "syscall": name }],
    }});
    let known = seccompiler::compile_from_json(probe.to_string().as_bytes(), arch).is_ok();
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_string(), known);
    known
}

fn condition(name: &str, a: &LinuxSeccompArg) -> Result<Value, SeccompError> {
    if a.index() > 5 {
        return Err(SeccompError::ArgIndex {
            name: name.to_string(),
            index: a.index(),
        });
    }
    let (op, val) = match a.op() {
        LinuxSeccompOperator::ScmpCmpNe => (json!("ne"), a.value()),
        LinuxSeccompOperator::ScmpCmpLt => (json!("lt"), a.value()),
        LinuxSeccompOperator::ScmpCmpLe => (json!("le"), a.value()),
        LinuxSeccompOperator::ScmpCmpEq => (json!("eq"), a.value()),
        LinuxSeccompOperator::ScmpCmpGe => (json!("ge"), a.value()),
        LinuxSeccompOperator::ScmpCmpGt => (json!("gt"), a.value()),
        // OCI: value is the mask, valueTwo what the masked argument equals.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            json!({ "masked_eq": a.value() }),
            a.value_two()
                .ok_or_else(|| SeccompError::MaskedEqWithoutValue {
                    name: name.to_string(),
                })?,
        ),
    };
    Ok(json!({ "index": a.index(), "type": "qword", "op": op, "val": val }))
}

/// One compiled filter. A call named both without and with conditions
/// matches unconditionally (seccompiler would keep only the conditions).
fn filter(
    mismatch: Value,
    matched: Value,
    rules: Vec<Value>,
    arch: TargetArch,
) -> Result<BpfProgram, SeccompError> {
    let unconditional: Vec<String> = rules
        .iter()
        .filter(|r| r.get("args").is_none())
        .filter_map(|r| r["syscall"].as_str().map(str::to_string))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let rules: Vec<Value> = rules
        .into_iter()
        .filter(|r| {
            let name = r["syscall"].as_str().unwrap_or_default();
            if unconditional.iter().any(|u| u == name) {
                // Keep one plain rule per such call.
                r.get("args").is_none() && seen.insert(name.to_string())
            } else {
                true
            }
        })
        .collect();
    let doc = json!({ "f": {
        "mismatch_action": mismatch,
        "match_action": matched,
        "filter": rules,
    }});
    let mut map = seccompiler::compile_from_json(doc.to_string().as_bytes(), arch)
        .map_err(|e| SeccompError::Compile(e.to_string()))?;
    map.remove("f")
        .ok_or_else(|| SeccompError::Compile("no filter came out".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn allow_all_is_no_filter_and_a_deny_list_is_one() {
        let p = profile(json!({ "defaultAction": "SCMP_ACT_ALLOW" }));
        assert!(compile(&p).unwrap().is_empty());
        let p = profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{ "names": ["kexec_load", "no_such_call"], "action": "SCMP_ACT_ERRNO" }]
        }));
        assert_eq!(compile(&p).unwrap().len(), 1);
    }

    #[test]
    fn an_allow_list_with_other_actions_stacks_filters() {
        let p = profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                { "names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW" },
                { "names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38,
                  "args": [{ "index": 0, "value": 0x10000000, "valueTwo": 0x10000000, "op": "SCMP_CMP_MASKED_EQ" }] },
                { "names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS" }
            ]
        }));
        // default filter + errno 38 + kill_process
        assert_eq!(compile(&p).unwrap().len(), 3);
    }

    #[test]
    fn bad_profiles_are_named() {
        let p = profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{ "names": ["clone"], "action": "SCMP_ACT_ERRNO",
                           "args": [{ "index": 7, "value": 1, "op": "SCMP_CMP_EQ" }] }]
        }));
        let e = compile(&p).unwrap_err().to_string();
        assert!(e.contains("clone") && e.contains("index 7"), "{e}");
        let p = profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{ "names": ["clone"], "action": "SCMP_ACT_NOTIFY" }]
        }));
        assert!(matches!(
            compile(&p),
            Err(SeccompError::UnsupportedAction(_))
        ));
    }

    /// Installed in a forked child: the denied call fails with the errno
    /// the profile gives, others work.
    #[test]
    fn an_installed_filter_denies_what_it_names() {
        let p = profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{ "names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13 }]
        }));
        let filters = compile(&p).unwrap();
        // SAFETY: the child only makes raw syscalls and _exits; it touches
        // no lock another thread of the test process might hold.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: prctl with constant arguments.
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                use crate::syscall::{LinuxSyscall, Syscall};
                let installed = filters
                    .iter()
                    .try_for_each(|f| LinuxSyscall.set_seccomp_filter(f));
                let code = match installed {
                    Err(_) => 1,
                    Ok(()) => {
                        // SAFETY: raw syscalls without pointers.
                        let denied = unsafe { libc::syscall(libc::SYS_getppid) };
                        let errno = std::io::Error::last_os_error().raw_os_error();
                        // SAFETY: as above.
                        let allowed = unsafe { libc::syscall(libc::SYS_getpid) };
                        if denied == -1 && errno == Some(13) && allowed > 0 {
                            0
                        } else {
                            2
                        }
                    }
                };
                // SAFETY: _exit ends the forked child at once.
                unsafe { libc::_exit(code) }
            }
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            child => {
                let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None)
                    .expect("waitpid");
                assert_eq!(
                    status,
                    nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(child), 0)
                );
            }
        }
    }
}
