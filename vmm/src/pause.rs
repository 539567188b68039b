//! Pausing vCPU threads: the owner closes the gate and kicks every vCPU out
//! of KVM_RUN; each parks at the top of its loop until the gate opens or
//! the VM stops. The owner knows all are parked when the count says so.

use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Debug, Default)]
struct State {
    paused: bool,
    parked: usize,
    /// The VM is ending: nobody parks any more.
    ending: bool,
}

#[derive(Debug, Default)]
pub struct PauseGate {
    state: Mutex<State>,
    changed: Condvar,
}

impl PauseGate {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Called by a vCPU thread between runs: blocks while paused.
    pub fn park_if_paused(&self) {
        let mut state = self.lock();
        if !state.paused || state.ending {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.paused && !state.ending {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.parked -= 1;
        self.changed.notify_all();
    }

    /// Closes the gate (the caller then kicks the vCPUs).
    pub fn pause(&self) {
        self.lock().paused = true;
    }

    /// Blocks until `expected()` vCPUs are parked (re-evaluated whenever a
    /// vCPU parks or leaves, see [`Self::notify`]), or the VM ends.
    pub fn wait_parked(&self, expected: impl Fn() -> usize) {
        let mut state = self.lock();
        while state.paused && !state.ending && state.parked < expected() {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }

    /// Releases every parked vCPU for good (the VM is stopping).
    pub fn end(&self) {
        self.lock().ending = true;
        self.changed.notify_all();
    }

    /// Wakes waiters to re-check (a vCPU thread left).
    pub fn notify(&self) {
        let _state = self.lock();
        self.changed.notify_all();
    }
}
