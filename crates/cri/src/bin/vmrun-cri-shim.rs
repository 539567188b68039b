//! `vmrun-cri-shim`: the owner of one CRI pod (see `vmrun_cri::owner`).
//!
//! ```text
//! vmrun-cri-shim POD_DIR --ready-fd FD
//! ```
//!
//! Started detached by `vmrun serve` for each RunPodSandbox; reports `ok`
//! (or why the sandbox could not be made) on FD, then serves the pod on
//! `POD_DIR/owner.sock` until RemovePodSandbox.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use anyhow::{bail, Context};

fn parse_args() -> anyhow::Result<(PathBuf, i32)> {
    let usage = "usage: vmrun-cri-shim POD_DIR --ready-fd FD (started by `vmrun serve`)";
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [dir, flag, fd] if flag == "--ready-fd" => {
            Ok((PathBuf::from(dir), fd.parse().context("--ready-fd FD")?))
        }
        _ => bail!("{usage}"),
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMRUN_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = parse_args().and_then(|(dir, fd)| {
        // SAFETY: `vmrun serve` set FD up as the write end of its ready pipe
        // for this process and nothing else here owns it.
        let ready = unsafe { OwnedFd::from_raw_fd(fd) };
        // Not for the containers: a child holding it would keep the daemon waiting.
        nix::fcntl::fcntl(
            &ready,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")?
            .block_on(vmrun_cri::owner::run(dir, std::fs::File::from(ready)))
    });
    if let Err(e) = result {
        eprintln!("vmrun-cri-shim: error: {e:#}");
        std::process::exit(1);
    }
}
