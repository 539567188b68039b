//! The engine's side of the controller channel: start requests become one
//! thread each (its own current-thread tokio runtime driving its store, so
//! the thread's CPU clock is the container's), signals reach their
//! container's [`Control`], and every start and exit is reported back.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use vmrun_pod::wasm::protocol::{self, ChannelError, Event, Request, StartRequest};

use crate::container::{Control, Runner};

/// Serves the controller until it goes away; then returns (the process
/// exits and its containers with it).
pub fn serve(sock: OwnedFd, runner: Arc<Runner>) {
    let sock = Arc::new(sock);
    let controls: Arc<Mutex<HashMap<u64, Arc<Control>>>> = Arc::default();
    loop {
        match protocol::recv::<Request>(sock.as_fd()) {
            Ok((Request::Start(request), fds)) => {
                start(&sock, &runner, &controls, request, fds);
            }
            Ok((Request::Signal { id, signal }, _)) => {
                let control = controls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&id)
                    .cloned();
                if let Some(control) = control {
                    control.deliver(signal);
                }
            }
            Err(ChannelError::Closed) => return,
            Err(e) => {
                // One bad message does not end the pod's other containers.
                tracing::error!("controller message: {e}");
                if matches!(e, ChannelError::Socket(_)) {
                    return;
                }
            }
        }
    }
}

fn send(sock: &OwnedFd, event: &Event) {
    if let Err(e) = protocol::send(sock.as_fd(), event, &[]) {
        tracing::error!("reporting {event:?}: {e}");
    }
}

fn start(
    sock: &Arc<OwnedFd>,
    runner: &Arc<Runner>,
    controls: &Arc<Mutex<HashMap<u64, Arc<Control>>>>,
    request: StartRequest,
    fds: Vec<OwnedFd>,
) {
    let id = request.id;
    let [stdout, stderr]: [OwnedFd; 2] = match fds.try_into() {
        Ok(pair) => pair,
        Err(fds) => {
            let message = format!(
                "start request with {} file descriptors (stdout and stderr expected)",
                fds.len()
            );
            return send(sock, &Event::StartFailed { id, message });
        }
    };
    let control = Arc::new(Control::default());
    controls
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, control.clone());
    let (sock2, runner2, controls2) = (sock.clone(), runner.clone(), controls.clone());
    let spawned = std::thread::Builder::new()
        .name(format!("wasm-{}", request.name))
        .spawn(move || {
            let started = |r: Result<(), String>| match r {
                Ok(()) => send(&sock2, &Event::Started { id }),
                Err(message) => send(&sock2, &Event::StartFailed { id, message }),
            };
            let outcome = runner2.run(&request, stdout.into(), stderr.into(), control, started);
            controls2
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            if let Some(o) = outcome {
                send(
                    &sock2,
                    &Event::Exited {
                        id,
                        code: o.code,
                        signal: o.signal,
                        oom_killed: o.oom_killed,
                    },
                );
            }
        });
    if let Err(e) = spawned {
        controls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        send(
            sock,
            &Event::StartFailed {
                id,
                message: format!("container thread: {e}"),
            },
        );
    }
}
