//! `vmrun-wasm`: a pod's wasm engine process, started by the pod's
//! controller with its channel as fd 3 (see `vmrun_pod::wasm::protocol`).

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use vmrun_pod::wasm::protocol::ENGINE_SOCKET_FD;
use vmrun_wasm::{cache::ModuleCache, container::Runner, engine, server};

#[derive(Parser)]
#[command(
    name = "vmrun-wasm",
    about = "A pod's WebAssembly engine (started by vmrun, not by hand)"
)]
struct Args {
    /// The pod's directory (names the pod in `ps`; nothing is read from it).
    #[arg(long)]
    pod: Option<PathBuf>,
    /// Directory of compiled modules, shared by every pod.
    #[arg(long)]
    cache: PathBuf,
    /// Containers (stores) alive at once: sizes the instance pool.
    #[arg(long, default_value_t = 8)]
    instances: u32,
    /// Largest linear memory of any container, in bytes.
    #[arg(long, default_value_t = 4 << 30)]
    max_memory: u64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMRUN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    nix::fcntl::fcntl(
        // SAFETY: only checks that fd 3 is open before it is owned below.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(ENGINE_SOCKET_FD) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .context("fd 3 (the controller's channel) is not open: vmrun-wasm is started by vmrun")?;
    // SAFETY: fd 3 is open (checked above) and was handed to this process
    // for it alone; nothing else in the process uses it.
    let sock = unsafe { OwnedFd::from_raw_fd(ENGINE_SOCKET_FD) };
    let engine = engine::create(engine::EngineSizing {
        instances: args.instances,
        max_memory: args.max_memory,
    })?;
    engine::start_ticker(&engine);
    let cache = ModuleCache::new(&args.cache, &engine);
    let runner = Arc::new(Runner::new(engine, cache)?);
    server::serve(sock, runner);
    Ok(())
}
