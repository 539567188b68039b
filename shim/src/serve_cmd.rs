//! `vmrun serve`: the CRI v1 server kubelet and crictl talk to.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::config::{beside_vmrun, Config};

#[derive(Args)]
pub struct ServeArgs {
    /// The CRI socket (default from the config file's [cri] socket, else
    /// /run/vmrun/vmrun.sock).
    #[arg(long, env = "VMRUN_CRI_SOCKET")]
    socket: Option<PathBuf>,
}

pub async fn serve(config: &Config, args: ServeArgs) -> anyhow::Result<()> {
    let mut cri = config.cri.clone();
    if let Some(socket) = args.socket {
        cri.socket = socket;
    }
    let opts = vmrun_cri::daemon::ServeOptions {
        cri,
        state: config.state.clone(),
        image_root: config.root.clone(),
        registries: config.registries.clone(),
        pids_limit: config.pids_limit,
        proc_view: config.proc_view_setup(),
        vm_assets: config.vm_assets(),
        vm_max_vcpus: config.vm.max_vcpus,
        shim: beside_vmrun("vmrun-cri-shim"),
    };
    eprintln!("vmrun: serving CRI on {}", opts.cri.socket.display());
    vmrun_cri::daemon::serve(opts, shutdown_signal())
        .await
        .context("vmrun serve")
}

/// SIGINT or SIGTERM: stop serving; pods keep running under their owners.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
