//! Kicking vCPU threads out of KVM_RUN with a real-time signal.
//!
//! vCPU threads are born with the kick signal blocked (the spawning thread
//! blocks it around `spawn`), and KVM_RUN unblocks it through
//! KVM_SET_SIGNAL_MASK. A kick sent at any moment therefore either
//! interrupts a running KVM_RUN or stays pending and makes the next one
//! return at once: no kick is lost, and none needs repeating.

use std::io;
use std::os::unix::thread::JoinHandleExt;
use std::sync::OnceLock;
use std::thread::JoinHandle;

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// Offset from SIGRTMIN of the kick signal.
const KICK_SIGNAL_OFFSET: libc::c_int = 3;

pub fn kick_signal() -> libc::c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the point is that KVM_RUN returns with EINTR.
}

/// Installs the (empty) kick handler once per process, so a delivered kick
/// interrupts instead of killing the process.
pub fn install_handler() -> io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let installed = INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()));
    installed.map_err(io::Error::from_raw_os_error)
}

fn set_mask(how: libc::c_int, set: &libc::sigset_t) -> io::Result<libc::sigset_t> {
    // SAFETY: an all-zero sigset_t is a valid set for the old mask.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to valid, initialized sigset_t values.
    let ret = unsafe { libc::pthread_sigmask(how, set, &mut old) };
    if ret == 0 {
        Ok(old)
    } else {
        Err(io::Error::from_raw_os_error(ret))
    }
}

/// Runs `spawn` with the kick signal blocked, so the new thread inherits a
/// blocked kick signal from its first instruction on; the caller's own mask
/// is restored afterwards.
pub fn spawn_with_kick_blocked<T>(spawn: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    // SAFETY: an all-zero sigset_t is a valid empty set to fill.
    let mut kick_only: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `kick_only` is a valid sigset_t and the signal number is valid.
    unsafe {
        libc::sigemptyset(&mut kick_only);
        libc::sigaddset(&mut kick_only, kick_signal());
    }
    let old = set_mask(libc::SIG_BLOCK, &kick_only)?;
    let spawned = spawn();
    set_mask(libc::SIG_SETMASK, &old)?;
    spawned
}

/// Sends the kick signal to a vCPU thread. A thread that already exited is
/// not an error.
pub fn kick<T>(thread: &JoinHandle<T>) -> io::Result<()> {
    if thread.is_finished() {
        return Ok(());
    }
    // SAFETY: the pthread_t comes from a JoinHandle not yet joined, so it
    // still names a valid (possibly finished but unjoined) thread.
    let ret = unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
    match ret {
        0 | libc::ESRCH => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}
