//! `vmrun-procview`: serves the containers' /proc view (see the
//! `vmrun_procview` crate).
//!
//! * `vmrun-procview start [MOUNTPOINT]`: starts the daemon in the
//!   background and returns once it serves (what pods call);
//! * `vmrun-procview serve [MOUNTPOINT]`: serves in the foreground (for a
//!   systemd unit, or to watch it).

use std::path::PathBuf;
use std::process::ExitCode;

use vmrun_procview::{daemon, keeper, view::Roots, DEFAULT_MOUNTPOINT};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let mountpoint = PathBuf::from(args.next().unwrap_or_else(|| DEFAULT_MOUNTPOINT.into()));
    let result = match command.as_str() {
        "start" => daemon::start_detached(&mountpoint, &mountpoint.with_extension("log")),
        "serve" => keeper::serve(&mountpoint, Roots::default(), || {
            eprintln!("vmrun-procview: serving {}", mountpoint.display())
        })
        .map_err(|e| e.to_string()),
        _ => Err("usage: vmrun-procview start|serve [MOUNTPOINT]".to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmrun-procview: {e}");
            ExitCode::FAILURE
        }
    }
}
