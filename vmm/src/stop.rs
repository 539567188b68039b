//! Why a guest stopped, and the one-shot signal that carries it from the
//! device or vCPU that saw it to the thread waiting for the VM to end.

use std::fmt;
use std::sync::{Condvar, Mutex};

/// Why the guest stopped. The first reason reported wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestStop {
    /// The guest asked for a reset (i8042 pulse or KVM system event): with
    /// no reboot support, the VM ends.
    Reset,
    /// The guest asked to power off (KVM system event).
    PowerOff,
    /// The guest wrote `code` to the debug-exit port.
    DebugExit(u8),
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: u8 },
    /// The guest reported a crash (KVM system event).
    Crash { vcpu: u8 },
    /// Every vCPU halted with nothing left to wake it.
    AllVcpusHalted,
    /// A vCPU could not go on: hypervisor error or unhandled exit.
    VcpuFailed { vcpu: u8, reason: String },
    /// The host stopped the VM through the control API (`stop`, or a
    /// `shutdown` whose grace period ran out).
    HostStop,
    /// The guest kernel printed `line` (its panic message) and then reset
    /// or powered off (`panic=-1`).
    KernelPanic { line: String },
}

impl GuestStop {
    /// The VMM's exit status for this stop: 0 for a requested power-off or
    /// reset, the guest's own code for the debug-exit port, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            GuestStop::Reset | GuestStop::PowerOff | GuestStop::HostStop => 0,
            GuestStop::DebugExit(code) => i32::from(*code),
            _ => 1,
        }
    }

    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }

    /// A reset or power-off that followed a kernel panic message is the
    /// panic, not a clean stop.
    pub fn after_panic(self, panic_line: Option<String>) -> GuestStop {
        match (self, panic_line) {
            (GuestStop::Reset | GuestStop::PowerOff | GuestStop::AllVcpusHalted, Some(line)) => {
                GuestStop::KernelPanic { line }
            }
            (stop, _) => stop,
        }
    }
}

impl fmt::Display for GuestStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestStop::Reset => write!(f, "guest requested a reset"),
            GuestStop::PowerOff => write!(f, "guest powered off"),
            GuestStop::DebugExit(code) => write!(f, "guest exited with status {code}"),
            GuestStop::TripleFault { vcpu } => {
                write!(f, "guest crashed: triple fault on vCPU {vcpu}")
            }
            GuestStop::Crash { vcpu } => write!(f, "guest crashed: crash event on vCPU {vcpu}"),
            GuestStop::AllVcpusHalted => write!(f, "guest halted all vCPUs"),
            GuestStop::VcpuFailed { vcpu, reason } => write!(f, "vCPU {vcpu} failed: {reason}"),
            GuestStop::HostStop => write!(f, "stopped through the control API"),
            GuestStop::KernelPanic { line } => write!(f, "guest kernel panicked: {line}"),
        }
    }
}

type Notifier = Box<dyn Fn() + Send>;

/// A one-shot, first-wins stop request with a blocking wait.
#[derive(Default)]
pub struct StopSignal {
    reason: Mutex<Option<GuestStop>>,
    stopped: Condvar,
    /// Called once when the stop is requested, for a waiter that also
    /// waits for other things (the VM owner's event channel).
    notifier: Mutex<Option<Notifier>>,
}

impl fmt::Debug for StopSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StopSignal")
            .field("reason", &*self.lock())
            .finish_non_exhaustive()
    }
}

impl StopSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `reason` unless a stop was already requested.
    pub fn request(&self, reason: GuestStop) {
        let mut current = self.lock();
        if current.is_none() {
            *current = Some(reason);
            self.stopped.notify_all();
            drop(current);
            if let Some(notify) = self
                .notifier
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                notify();
            }
        }
    }

    /// Calls `notify` once when a stop is requested (at once if it already
    /// was).
    pub fn on_request(&self, notify: impl Fn() + Send + 'static) {
        *self.notifier.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(notify));
        if self.is_requested() {
            if let Some(notify) = self
                .notifier
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                notify();
            }
        }
    }

    /// The reason, if a stop was requested.
    pub fn reason(&self) -> Option<GuestStop> {
        self.lock().clone()
    }

    pub fn is_requested(&self) -> bool {
        self.lock().is_some()
    }

    /// Blocks until a stop is requested; returns its reason.
    pub fn wait(&self) -> GuestStop {
        let mut current = self.lock();
        loop {
            if let Some(reason) = current.as_ref() {
                return reason.clone();
            }
            current = self
                .stopped
                .wait(current)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<GuestStop>> {
        self.reason
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_request_wins_and_wakes_the_waiter() {
        let signal = Arc::new(StopSignal::new());
        let waiter = {
            let signal = signal.clone();
            std::thread::spawn(move || signal.wait())
        };
        signal.request(GuestStop::DebugExit(3));
        signal.request(GuestStop::Reset);
        assert_eq!(waiter.join().unwrap(), GuestStop::DebugExit(3));
        assert!(signal.is_requested());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(GuestStop::Reset.exit_code(), 0);
        assert_eq!(GuestStop::DebugExit(7).exit_code(), 7);
        assert_eq!(GuestStop::TripleFault { vcpu: 0 }.exit_code(), 1);
        let panic = GuestStop::Reset.after_panic(Some("Kernel panic - not syncing: x".into()));
        assert_eq!(panic.exit_code(), 1);
        assert_eq!(
            panic.to_string(),
            "guest kernel panicked: Kernel panic - not syncing: x"
        );
        assert_eq!(GuestStop::Reset.after_panic(None), GuestStop::Reset);
        assert_eq!(
            GuestStop::DebugExit(3).after_panic(Some("x".into())),
            GuestStop::DebugExit(3)
        );
        assert_eq!(
            GuestStop::TripleFault { vcpu: 1 }.to_string(),
            "guest crashed: triple fault on vCPU 1"
        );
    }
}
