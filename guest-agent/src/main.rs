//! `vmrun-agent`: the guest's /init.
//!
//! ```text
//! vmrun-agent                                     as PID 1: set up the guest, serve gRPC on
//!                                                 vsock 1024 and port forwarding on vsock 1025
//! vmrun-agent --listen-unix PATH [--forward-unix PATH] [--state-dir DIR] [--cgroup-parent CG]
//!                                                 serve on unix sockets (tests on the host);
//!                                                 prints "READY" once listening
//! vmrun-agent --listen-vsock PORT [--forward-vsock PORT] [...]
//!                                                 serve on vsock without being PID 1 (port
//!                                                 forwarding on vsock 1025 unless given)
//! ```

use std::path::PathBuf;

use anyhow::{bail, Context};
use nix::unistd::{fork, ForkResult};
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};
use vmrun_agent::{init, log, AgentConfig, AgentService};

enum Listen {
    Vsock(u32),
    Unix(PathBuf),
}

struct Args {
    listen: Listen,
    /// The port-forward listener; `None` with `--listen-unix` and no
    /// `--forward-unix`.
    forward: Option<Listen>,
    state_dir: Option<PathBuf>,
    cgroup_parent: Option<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        listen: Listen::Vsock(vmrun_proto::AGENT_VSOCK_PORT),
        forward: None,
        state_dir: None,
        cgroup_parent: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen-unix" => args.listen = Listen::Unix(value()?.into()),
            "--listen-vsock" => {
                args.listen = Listen::Vsock(value()?.parse().context("--listen-vsock PORT")?)
            }
            "--forward-unix" => args.forward = Some(Listen::Unix(value()?.into())),
            "--forward-vsock" => {
                args.forward = Some(Listen::Vsock(
                    value()?.parse().context("--forward-vsock PORT")?,
                ))
            }
            "--state-dir" => args.state_dir = Some(value()?.into()),
            "--cgroup-parent" => args.cgroup_parent = Some(value()?),
            other => bail!("unknown argument {other:?} (see the source's usage)"),
        }
    }
    if args.forward.is_none() && matches!(args.listen, Listen::Vsock(_)) {
        args.forward = Some(Listen::Vsock(vmrun_proto::PORT_FORWARD_VSOCK_PORT));
    }
    Ok(args)
}

fn main() {
    let boot_ns = vmrun_agent::boottime_ns();
    log::init();
    if nix::unistd::getpid().as_raw() == 1 {
        pid1(boot_ns);
    }
    match parse_args().and_then(|args| serve(args, boot_ns)) {
        Ok(()) => {}
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::exit(1);
        }
    }
}

/// PID 1: prepare the guest, fork the server, reap, power off. Any failure
/// powers the guest off too: PID 1 must never exit (the kernel would panic).
fn pid1(boot_ns: u64) -> ! {
    // A panic in PID 1 would panic the kernel; in the forked server it just
    // ends the server, which PID 1 notices.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("panic: {info}");
        if nix::unistd::getpid().as_raw() == 1 {
            init::power_off();
        }
    }));
    if let Err(e) = init::leave_rootfs() {
        tracing::warn!("{e}; containers will fail to pivot_root");
    }
    if let Err(e) = init::mount_filesystems() {
        tracing::error!("{e}");
        init::power_off();
    }
    if let Err(e) = log::use_kmsg() {
        tracing::warn!("open /dev/kmsg: {e}; logging to the console");
    }
    let missing = init::enable_cgroup_controllers(std::path::Path::new("/sys/fs/cgroup"));
    if !missing.is_empty() {
        tracing::warn!("cgroup controllers not available: {}", missing.join(" "));
    }
    match std::fs::read_to_string("/proc/cmdline") {
        Ok(cmdline) => match init::apply_page_reporting_order(
            &cmdline,
            std::path::Path::new(init::PAGE_REPORTING_ORDER_SYSFS),
        ) {
            Ok(Some(order)) => tracing::info!("free page reporting from order {order}"),
            Ok(None) => {}
            Err(e) => tracing::warn!("{e}"),
        },
        Err(e) => tracing::warn!("read /proc/cmdline: {e}"),
    }
    if let Err(e) = init::loopback_up() {
        tracing::warn!("bring up lo: {e}");
    }
    init::start_proc_view();
    // SAFETY: PID 1 is still single-threaded here (no runtime, no threads
    // yet), so the child may run arbitrary code after fork.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let args = Args {
                listen: Listen::Vsock(vmrun_proto::AGENT_VSOCK_PORT),
                forward: Some(Listen::Vsock(vmrun_proto::PORT_FORWARD_VSOCK_PORT)),
                state_dir: None,
                cgroup_parent: None,
            };
            let code = match serve(args, boot_ns) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("{e:#}");
                    1
                }
            };
            std::process::exit(code);
        }
        Ok(ForkResult::Parent { child }) => {
            let end = init::reap_until(child);
            if end.clean {
                tracing::info!("agent server {}; powering off", end.how);
            } else {
                // At error level it reaches the console, whose last lines
                // the host reports as why the pod VM died.
                tracing::error!("agent server {}; powering off", end.how);
            }
        }
        Err(e) => tracing::error!("fork the agent server: {e}; powering off"),
    }
    init::power_off()
}

/// Runs the gRPC server until a Shutdown call (or a listener error).
fn serve(args: Args, boot_ns: u64) -> anyhow::Result<()> {
    let mut cfg = AgentConfig::guest(boot_ns);
    if let Some(dir) = args.state_dir {
        cfg.state_dir = dir;
    }
    if let Some(parent) = args.cgroup_parent {
        cfg.cgroup_parent = parent;
    }
    // One thread: the agent mostly waits; blocking container work goes to
    // tokio's blocking pool, which only spawns threads on demand.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    runtime.block_on(async move {
        let service = AgentService::new(cfg);
        // Bound before the gRPC listener: once the host gets gRPC answers,
        // forwarding works too.
        match args.forward {
            None => {}
            Some(Listen::Vsock(port)) => {
                let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))
                    .with_context(|| format!("listen on vsock port {port} (port forward)"))?;
                tracing::info!("port forwarding on vsock port {port}");
                tokio::spawn(service.clone().serve_port_forward(listener.incoming()));
            }
            Some(Listen::Unix(path)) => {
                let _ = std::fs::remove_file(&path);
                let listener = tokio::net::UnixListener::bind(&path)
                    .with_context(|| format!("listen on {} (port forward)", path.display()))?;
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                tokio::spawn(service.clone().serve_port_forward(incoming));
            }
        }
        match args.listen {
            Listen::Vsock(port) => {
                let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))
                    .with_context(|| format!("listen on vsock port {port}"))?;
                tracing::info!("serving on vsock port {port}");
                service.serve(listener.incoming()).await?;
            }
            Listen::Unix(path) => {
                let _ = std::fs::remove_file(&path);
                let listener = tokio::net::UnixListener::bind(&path)
                    .with_context(|| format!("listen on {}", path.display()))?;
                println!("READY");
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                service.serve(incoming).await?;
            }
        }
        tracing::info!("server stopped");
        Ok(())
    })
}
