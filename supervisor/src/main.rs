//! `vmrun-supervisor`: runs one detached pod for its whole life.
//!
//! ```text
//! vmrun-supervisor POD_DIR --ready-fd FD --restart-backoff-ms MS
//! ```
//!
//! `vmrun run -d` validates the manifest, pulls the images, writes the
//! prepared pod to `POD_DIR/prepared.json` and starts this process with the
//! write end of a pipe as FD, on which it reports `ok` once the pod's
//! sandbox exists, or the reason it failed. From then on this process owns
//! the pod (its record in POD_DIR, its containers or its VMM) until the pod
//! ends or is stopped with SIGTERM (`vmrun stop`).
//!
//! It is a binary of its own, not a `vmrun` subcommand, because it lives as
//! long as its pod: per-pod memory, which a small program keeps small (the
//! image store, the registry client and the manifest parser are not in it).

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;
use vmrun_pod::controller::{run_pod, RunOptions};
use vmrun_pod::prepared::{PreparedPod, PREPARED_FILE};
use vmrun_pod::signals::stop_on_signals;
use vmrun_pod::state::{PodPhase, PodRecord, StateStore};

struct Args {
    pod_dir: PathBuf,
    ready_fd: i32,
    restart_backoff: Duration,
}

fn parse_args() -> anyhow::Result<Args> {
    let usage = "usage: vmrun-supervisor POD_DIR --ready-fd FD --restart-backoff-ms MS \
                 (started by `vmrun run -d`)";
    let mut pod_dir = None;
    let mut ready_fd = None;
    let mut restart_backoff = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .with_context(|| format!("{arg} needs a value; {usage}"))
        };
        match arg.as_str() {
            "--ready-fd" => ready_fd = Some(value()?.parse().context("--ready-fd FD")?),
            "--restart-backoff-ms" => {
                let ms = value()?.parse().context("--restart-backoff-ms MS")?;
                restart_backoff = Some(Duration::from_millis(ms));
            }
            flag if flag.starts_with('-') => bail!("unknown flag {flag:?}; {usage}"),
            dir if pod_dir.is_none() => pod_dir = Some(PathBuf::from(dir)),
            extra => bail!("unexpected argument {extra:?}; {usage}"),
        }
    }
    Ok(Args {
        pod_dir: pod_dir.context(usage)?,
        ready_fd: ready_fd.context(usage)?,
        restart_backoff: restart_backoff.context(usage)?,
    })
}

fn main() {
    one_malloc_arena();
    init_logging();
    let code = match parse_args().and_then(|args| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")?
            .block_on(supervise(args))
    }) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmrun-supervisor: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

async fn supervise(args: Args) -> anyhow::Result<i32> {
    // SAFETY: `vmrun run -d` set FD up as the write end of its ready pipe and
    // nothing else in this process owns it.
    let ready_fd = unsafe { OwnedFd::from_raw_fd(args.ready_fd) };
    // dup2 left it inheritable: a child that kept it (a pod VM's VMM) would
    // hold `vmrun run -d` waiting for the pipe's end forever.
    nix::fcntl::fcntl(
        &ready_fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    let mut ready = Some(std::fs::File::from(ready_fd));
    let mut report = |message: &str| {
        if let Some(mut pipe) = ready.take() {
            let _ = writeln!(pipe, "{message}");
        }
    };
    let pod = match PreparedPod::take(&args.pod_dir.join(PREPARED_FILE)) {
        Ok(pod) => pod,
        Err(e) => {
            report(&e.to_string());
            return Err(e.into());
        }
    };
    let record = PodRecord::pending(&pod.plan, pod.runtime_name());
    let pod = pod.into_runnable();
    let store = Arc::new(StateStore::create(args.pod_dir.clone(), record)?);
    let stop = CancellationToken::new();
    stop_on_signals(stop.clone()).context("handling SIGINT and SIGTERM")?;
    let opts = RunOptions {
        backoff_base: args.restart_backoff,
        terminal: false,
        network: pod.network.clone(),
        ..RunOptions::default()
    };
    let running = tokio::spawn(run_pod(
        pod.plan,
        pod.images,
        pod.runtime,
        store.clone(),
        opts,
        stop,
    ));
    // Report once the sandbox exists (or failed): the record's phase moves past Pending.
    let watcher = store.clone();
    let started =
        tokio::task::spawn_blocking(move || watcher.wait_for(|r| r.phase != PodPhase::Pending))
            .await?;
    match started.phase {
        PodPhase::Failed => report(
            started
                .message
                .as_deref()
                .unwrap_or("the pod failed to start"),
        ),
        _ => report("ok"),
    }
    let outcome = running.await?;
    Ok(outcome.exit_code)
}

/// Logs to stderr (the pod's `supervisor.log`), filtered by `VMRUN_LOG` as
/// `vmrun` is (`debug`, `vmrun_pod=debug,warn`, ...; default `warn`), with
/// target directives only: `Targets` parses them without the regex engine
/// `EnvFilter` would bring into this long-lived process.
fn init_logging() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = match std::env::var("VMRUN_LOG") {
        Ok(spec) => spec.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("vmrun-supervisor: VMRUN_LOG={spec:?}: {e}; logging warnings");
            Targets::new().with_default(LevelFilter::WARN)
        }),
        Err(_) => Targets::new().with_default(LevelFilter::WARN),
    };
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
}

/// The supervisor lives as long as its pod and mostly waits, so its memory
/// is per-pod overhead. glibc gives each thread that allocates an arena of
/// its own, and where transparent huge pages are "always" an arena's first
/// touch can cost a whole 2 MiB page (seen nested: 2-4 MiB of an idle vm
/// pod's PSS, docs/benchmarks.md). One shared arena costs these mostly
/// idle threads nothing measurable.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only changes glibc's allocator settings; it runs
        // first in main, before any other thread exists to allocate.
        let set = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
        if set == 0 {
            eprintln!("vmrun-supervisor: mallopt(M_ARENA_MAX, 1) refused; threads keep own arenas");
        }
    }
}
