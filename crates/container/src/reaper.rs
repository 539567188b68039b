//! Waiting for and signalling a child without the pid-reuse race: the pid is
//! only reaped while holding `state`, and signals are only sent while holding
//! it and seeing the child unreaped, so `signal()` can never hit a recycled
//! pid even when another thread is blocked in `wait()`.

use std::sync::Mutex;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit code, or 128 + signal number when killed by a signal.
    pub code: i32,
    pub signal: Option<i32>,
}

impl ExitStatus {
    fn from_wait(s: WaitStatus) -> Option<Self> {
        match s {
            WaitStatus::Exited(_, code) => Some(Self { code, signal: None }),
            WaitStatus::Signaled(_, sig, _) => Some(Self {
                code: 128 + sig as i32,
                signal: Some(sig as i32),
            }),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("process {0} has already exited")]
    Exited(i32),
    #[error("signal process {pid}: {source}")]
    Kill { pid: i32, source: Errno },
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("wait for process {pid}: {source}")]
    Wait { pid: i32, source: Errno },
}

#[derive(Debug)]
pub(crate) struct Child {
    pid: i32,
    state: Mutex<Option<ExitStatus>>,
}

impl Child {
    pub(crate) fn new(pid: i32) -> Self {
        Self {
            pid,
            state: Mutex::new(None),
        }
    }

    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<ExitStatus>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn exit_status(&self) -> Option<ExitStatus> {
        *self.lock()
    }

    pub(crate) fn signal(&self, sig: Signal) -> Result<(), SignalError> {
        let st = self.lock();
        if st.is_some() {
            return Err(SignalError::Exited(self.pid));
        }
        match nix::sys::signal::kill(Pid::from_raw(self.pid), sig) {
            // Still unreaped, so this pid is ours (possibly a zombie).
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(source) => Err(SignalError::Kill {
                pid: self.pid,
                source,
            }),
        }
    }

    /// Blocks until the process exits, reaps it and returns its status.
    /// Several threads may call this; all get the same status.
    pub(crate) fn wait(&self) -> Result<ExitStatus, WaitError> {
        loop {
            if let Some(s) = *self.lock() {
                return Ok(s);
            }
            // Wait without reaping, outside the lock (signal() stays usable).
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
            match waitid(Id::Pid(Pid::from_raw(self.pid)), flags) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => {
                    if let Some(s) = *self.lock() {
                        return Ok(s);
                    }
                    return Err(WaitError::Wait {
                        pid: self.pid,
                        source: Errno::ECHILD,
                    });
                }
                Err(source) => {
                    return Err(WaitError::Wait {
                        pid: self.pid,
                        source,
                    })
                }
            }
            let mut st = self.lock();
            if let Some(s) = *st {
                return Ok(s);
            }
            match waitpid(Pid::from_raw(self.pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(ws) => {
                    if let Some(s) = ExitStatus::from_wait(ws) {
                        *st = Some(s);
                        return Ok(s);
                    }
                }
                Err(Errno::EINTR) => {}
                Err(source) => {
                    return Err(WaitError::Wait {
                        pid: self.pid,
                        source,
                    })
                }
            }
        }
    }

    /// SIGKILL (if still running) and reap.
    pub(crate) fn kill_and_reap(&self) -> Result<ExitStatus, WaitError> {
        let _ = self.signal(Signal::SIGKILL);
        self.wait()
    }

    /// Reaps the process if it has exited; never blocks.
    pub(crate) fn try_reap(&self) -> Result<Option<ExitStatus>, WaitError> {
        let mut st = self.lock();
        if let Some(s) = *st {
            return Ok(Some(s));
        }
        match waitpid(Pid::from_raw(self.pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(ws) => {
                let s = ExitStatus::from_wait(ws);
                if s.is_some() {
                    *st = s;
                }
                Ok(s)
            }
            Err(Errno::EINTR) => Ok(None),
            Err(source) => Err(WaitError::Wait {
                pid: self.pid,
                source,
            }),
        }
    }

    /// SIGKILL and reap, giving up after `timeout`. A PID-namespace init
    /// only finishes exiting once every process of its namespace has been
    /// reaped, including processes whose parent is outside the namespace
    /// (containers or exec'd processes of the caller that nobody waited
    /// for), so this must not block forever.
    pub(crate) fn kill_and_reap_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> Result<Option<ExitStatus>, WaitError> {
        let _ = self.signal(Signal::SIGKILL);
        let end = std::time::Instant::now() + timeout;
        let mut pause = std::time::Duration::from_millis(1);
        loop {
            if let Some(s) = self.try_reap()? {
                return Ok(Some(s));
            }
            if std::time::Instant::now() >= end {
                return Ok(None);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(50));
        }
    }
}
