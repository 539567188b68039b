//! The VMM's own seccomp filters: one per kind of thread, each allowing
//! only the system calls that kind makes (Firecracker's model).
//!
//! Every thread installs its filter as the first thing it does
//! ([`ThreadFilters::enter`]). A filter is inherited by the threads its
//! thread creates and stacks with theirs, so threads that create others
//! install theirs last (the owner thread, after starting everyone) or
//! allow what their children need (the [`crate::spawner`] thread, which
//! starts device workers for the vCPU threads).
//!
//! A call outside the filter traps into a SIGSYS handler that says which
//! thread made which call on stderr (the VMM's log) and ends the VMM with
//! [`EXIT_SECCOMP`]: a VMM that something made do what it never does is
//! not trusted to go on.

mod rules;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use rules::ThreadKind;

/// The VMM's exit status after a forbidden system call.
pub const EXIT_SECCOMP: i32 = 159;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter of the {kind} threads: {reason}")]
    Build { kind: &'static str, reason: String },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// The compiled filters of every thread kind, or none (seccomp off).
#[derive(Clone, Default)]
pub struct ThreadFilters {
    programs: Option<Arc<BTreeMap<ThreadKind, Vec<BpfProgram>>>>,
}

thread_local! {
    /// The kind of this thread, for the SIGSYS handler's message.
    static KIND: Cell<&'static str> = const { Cell::new("unfiltered") };
}

impl ThreadFilters {
    /// No filters: every thread runs unconfined (`--seccomp off`, tests).
    pub fn none() -> Self {
        ThreadFilters { programs: None }
    }

    /// Compiles every kind's filter for this process (`pid` goes into the
    /// rules that only allow signals to the VMM itself) and installs the
    /// SIGSYS handler that reports a forbidden call.
    pub fn compile() -> Result<Self, SeccompError> {
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        let mut programs = BTreeMap::new();
        for kind in ThreadKind::ALL {
            let build_error = |reason: String| SeccompError::Build {
                kind: kind.name(),
                reason,
            };
            let allow_list = SeccompFilter::new(
                kind.rules(pid).map_err(|e| build_error(e.to_string()))?,
                SeccompAction::Trap,
                SeccompAction::Allow,
                TargetArch::x86_64,
            );
            // The allow list goes on last: installing a filter is a
            // system call it does not allow.
            let mut kind_programs = Vec::new();
            let refused = kind.refused_with_enosys();
            if !refused.is_empty() {
                let errors = SeccompFilter::new(
                    refused.iter().map(|&call| (call, Vec::new())).collect(),
                    SeccompAction::Allow,
                    SeccompAction::Errno(libc::ENOSYS as u32),
                    TargetArch::x86_64,
                );
                kind_programs.push(program(errors).map_err(build_error)?);
            }
            kind_programs.push(program(allow_list).map_err(build_error)?);
            programs.insert(kind, kind_programs);
        }
        install_sigsys_handler().map_err(SeccompError::Handler)?;
        Ok(ThreadFilters {
            programs: Some(Arc::new(programs)),
        })
    }

    pub fn is_active(&self) -> bool {
        self.programs.is_some()
    }

    /// Confines the calling thread to `kind`'s system calls. A thread
    /// that cannot be confined must not run: the VMM says so and exits.
    pub fn enter(&self, kind: ThreadKind) {
        let Some(programs) = &self.programs else {
            return;
        };
        KIND.with(|k| k.set(kind.name()));
        let installed = programs
            .get(&kind)
            .ok_or_else(|| "no filter compiled".to_string())
            .and_then(|kind_programs| {
                kind_programs.iter().try_for_each(|program| {
                    seccompiler::apply_filter(program).map_err(|e| e.to_string())
                })
            });
        if let Err(e) = installed {
            eprintln!(
                "vmrun-vmm: cannot install the seccomp filter of a {} thread: {e}",
                kind.name()
            );
            std::process::exit(1);
        }
    }
}

fn program(filter: Result<SeccompFilter, seccompiler::BackendError>) -> Result<BpfProgram, String> {
    filter
        .and_then(BpfProgram::try_from)
        .map_err(|e| e.to_string())
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler is
    // an `extern "C"` function with the SA_SIGINFO signature, and the
    // struct outlives the call.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Byte offset of `si_syscall` in a SIGSYS siginfo on x86_64: after
/// si_signo, si_errno, si_code (and padding to 16), then `_call_addr`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS from seccomp,
    // whose `_sigsys._syscall` int sits at SI_SYSCALL_OFFSET.
    let syscall = unsafe {
        (info as *const u8)
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    // Only async-signal-safe work from here: a message built on the stack,
    // one write, _exit.
    let mut message = Message::default();
    message.push(b"vmrun-vmm: seccomp: the ");
    message.push(KIND.with(Cell::get).as_bytes());
    message.push(b" thread made system call ");
    message.push_number(syscall);
    message.push(b", which its filter forbids; the VMM stops\n");
    // SAFETY: the buffer holds `len` initialized bytes; write and _exit are
    // async-signal-safe.
    unsafe {
        libc::write(2, message.bytes.as_ptr().cast(), message.len);
        libc::_exit(EXIT_SECCOMP);
    }
}

/// A fixed buffer for the handler's message (no allocation in a handler).
struct Message {
    bytes: [u8; 160],
    len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Message {
            bytes: [0; 160],
            len: 0,
        }
    }
}

impl Message {
    fn push(&mut self, text: &[u8]) {
        let n = text.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&text[..n]);
        self.len += n;
    }

    fn push_number(&mut self, value: i32) {
        let mut digits = [0u8; 12];
        let mut at = digits.len();
        let mut rest = i64::from(value).unsigned_abs();
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        if value < 0 {
            self.push(b"-");
        }
        self.push(&digits[at..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles() {
        let filters = ThreadFilters::compile().unwrap();
        assert!(filters.is_active());
        assert_eq!(
            filters.programs.as_ref().unwrap().len(),
            ThreadKind::ALL.len()
        );
    }

    #[test]
    fn the_handler_message_names_the_call() {
        let mut message = Message::default();
        message.push(b"call ");
        message.push_number(57);
        message.push(b" ");
        message.push_number(-3);
        assert_eq!(&message.bytes[..message.len], b"call 57 -3");
    }

    /// Run again as a child process (the filter then ends that process):
    /// an api thread making a call its filter does not have.
    #[test]
    fn a_forbidden_call_ends_the_vmm_with_a_message() {
        const CHILD: &str = "VMRUN_SECCOMP_TEST_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let filters = ThreadFilters::compile().unwrap();
            filters.enter(ThreadKind::Api);
            // SAFETY: getppid has no preconditions.
            let parent = unsafe { libc::getppid() };
            println!("getppid answered {parent}: no filter");
            std::process::exit(0);
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::a_forbidden_call_ends_the_vmm_with_a_message",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_SECCOMP), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "the api thread made system call {}",
                libc::SYS_getppid
            )),
            "{stderr}"
        );
    }
}
