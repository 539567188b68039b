//! `vmrun run`: a pod in the foreground (the CLI process supervises it) or, with
//! `-d`, under a detached `vmrun supervise` process.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;
use vmrun_pod::controller::{run_pod, RunOptions};
use vmrun_pod::plan::PodPlan;
use vmrun_pod::state::{self, ContainerPhase, ContainerRecord, PodPhase, PodRecord, StateStore};

use crate::config::Config;
use crate::prepare::{prepare, PreparedPod, PREPARED};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Kubernetes manifest: a Pod, optionally after ConfigMaps and Secrets (`---` separated).
    pub manifest: PathBuf,
    /// Run in the background; manage it with ps, logs, exec, stop and rm.
    #[arg(short, long)]
    pub detach: bool,
    /// Isolation: native, vm or wasm. Overrides the pod's spec.runtimeClassName.
    #[arg(long)]
    pub runtime: Option<String>,
    /// Keep the pod's record and logs after a foreground run ends (`vmrun rm` removes them).
    #[arg(long)]
    pub keep: bool,
    /// First restart back-off; doubles per restart up to 5 minutes (the kubelet's is 10s).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub restart_backoff: Duration,
}

#[derive(clap::Args)]
pub struct SuperviseArgs {
    /// The pod as `vmrun run -d` prepared it (read, then removed).
    #[arg(long)]
    prepared: PathBuf,
    /// Pipe to report "ok" or the start error to the waiting `vmrun run -d`.
    #[arg(long)]
    ready_fd: i32,
    #[arg(long)]
    restart_backoff_ms: u64,
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.trim().split_at(
        text.trim()
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(text.trim().len()),
    );
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?} (e.g. 10s, 500ms, 1m)"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" | "" => value,
        "m" => value * 60.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {text:?} (use ms, s or m)"
            ))
        }
    };
    Ok(Duration::from_secs_f64(secs))
}

fn random_uid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| format!("{:x}", std::process::id()))
}

/// Makes the pod's directory, refusing a pod of that name that still runs and
/// replacing the leftovers of one that ended.
fn claim_pod_dir(config: &Config, name: &str) -> anyhow::Result<PathBuf> {
    let dir = state::pod_dir(&config.state, name);
    if let Ok(record) = state::read(&dir) {
        if state::supervisor_alive(&record) {
            bail!("pod {name:?} is already running (see `vmrun ps`; stop it with `vmrun stop {name}`)");
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing the old pod {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn new_record(plan: &PodPlan, runtime: &str) -> PodRecord {
    let containers = plan
        .init_containers
        .iter()
        .map(|c| (c, true))
        .chain(plan.containers.iter().map(|c| (c, false)))
        .map(|(c, init)| {
            (
                c.name.clone(),
                ContainerRecord {
                    name: c.name.clone(),
                    init,
                    phase: ContainerPhase::Waiting,
                    pid: None,
                    restarts: 0,
                    attempt: 0,
                    ready: false,
                    last_exit: None,
                    reason: None,
                    exec_target: None,
                },
            )
        })
        .collect();
    PodRecord {
        name: plan.name.clone(),
        namespace: plan.namespace.clone(),
        uid: plan.uid.clone(),
        runtime: runtime.to_string(),
        phase: PodPhase::Pending,
        supervisor_pid: std::process::id(),
        created: chrono::Utc::now().to_rfc3339(),
        exit_code: None,
        message: None,
        containers,
    }
}

/// Cancels `stop` on SIGINT or SIGTERM and remembers which arrived.
fn stop_on_signals(stop: CancellationToken) -> anyhow::Result<Arc<std::sync::atomic::AtomicI32>> {
    use tokio::signal::unix::{signal, SignalKind};
    let received = Arc::new(std::sync::atomic::AtomicI32::new(0));
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let seen = received.clone();
    tokio::spawn(async move {
        let signo = tokio::select! {
            _ = int.recv() => libc::SIGINT,
            _ = term.recv() => libc::SIGTERM,
        };
        seen.store(signo, std::sync::atomic::Ordering::SeqCst);
        eprintln!("vmrun: stopping the pod (signal {signo})");
        stop.cancel();
    });
    Ok(received)
}

pub async fn run(config: &Config, args: RunArgs) -> anyhow::Result<i32> {
    let uid = random_uid();
    let pod = prepare(config, &args.manifest, args.runtime.as_deref(), &uid, true).await?;
    let name = pod.plan.name.clone();
    let dir = claim_pod_dir(config, &name)?;
    if args.detach {
        return detach(config, &args, &pod, &dir);
    }
    let prepared = pod.with_runtime(config)?;
    let store = Arc::new(StateStore::create(
        dir.clone(),
        new_record(&prepared.plan, prepared.runtime.name()),
    )?);
    let stop = CancellationToken::new();
    let received = stop_on_signals(stop.clone())?;
    let opts = RunOptions {
        backoff_base: args.restart_backoff,
        ..RunOptions::default()
    };
    let outcome = run_pod(
        prepared.plan,
        prepared.images,
        prepared.runtime,
        store,
        opts,
        stop,
    )
    .await;
    if let Some(message) = &outcome.message {
        eprintln!("vmrun: pod {name:?} failed: {message}");
    }
    if !args.keep {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let signo = received.load(std::sync::atomic::Ordering::SeqCst);
    Ok(if outcome.stopped && signo != 0 {
        128 + signo
    } else {
        outcome.exit_code
    })
}

fn detach(config: &Config, args: &RunArgs, pod: &PreparedPod, dir: &Path) -> anyhow::Result<i32> {
    let prepared_file = dir.join(PREPARED);
    pod.write(&prepared_file)?;
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let log = std::fs::File::create(dir.join("supervisor.log"))?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--root")
        .arg(&config.root)
        .arg("--state")
        .arg(&config.state);
    if let Some(path) = &config.source {
        cmd.arg("--config").arg(path);
    }
    cmd.arg("supervise")
        .arg("--prepared")
        .arg(&prepared_file)
        .arg("--ready-fd")
        .arg("3")
        .arg("--restart-backoff-ms")
        .arg(args.restart_backoff.as_millis().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let ready_raw = ready_w.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (setsid, dup2) on fds that stay open until then.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::dup2(ready_raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the pod supervisor")?;
    drop(ready_w);
    let mut answer = String::new();
    std::fs::File::from(ready_r).read_to_string(&mut answer)?;
    let answer = answer.trim();
    if answer == "ok" {
        println!("{}", pod.plan.name);
        Ok(0)
    } else {
        let _ = std::fs::remove_dir_all(dir);
        if answer.is_empty() {
            bail!(
                "the pod supervisor (pid {}) exited before the pod started; see {}",
                child.id(),
                dir.join("supervisor.log").display()
            );
        }
        bail!("{answer}");
    }
}

pub async fn supervise(config: &Config, args: SuperviseArgs) -> anyhow::Result<i32> {
    // SAFETY: fd 3 was set up by `vmrun run -d` as the write end of its ready pipe
    // and nothing else in this process owns it.
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
    let prepared = match PreparedPod::take(&args.prepared).and_then(|pod| pod.with_runtime(config))
    {
        Ok(p) => p,
        Err(e) => {
            report(&format!("{e:#}"));
            return Err(e);
        }
    };
    let dir = state::pod_dir(&config.state, &prepared.plan.name);
    let store = Arc::new(StateStore::create(
        dir,
        new_record(&prepared.plan, prepared.runtime.name()),
    )?);
    let stop = CancellationToken::new();
    stop_on_signals(stop.clone())?;
    let opts = RunOptions {
        backoff_base: Duration::from_millis(args.restart_backoff_ms),
        terminal: false,
        ..RunOptions::default()
    };
    let pod = tokio::spawn(run_pod(
        prepared.plan,
        prepared.images,
        prepared.runtime,
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
    let outcome = pod.await?;
    Ok(outcome.exit_code)
}
