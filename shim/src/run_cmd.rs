//! `vmrun run`: a pod in the foreground (the CLI process supervises it) or, with
//! `-d`, under a detached `vmrun-supervisor` process.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;
use vmrun_pod::controller::{run_pod, RunOptions};
use vmrun_pod::prepared::{PreparedPod, PREPARED_FILE};
use vmrun_pod::signals::stop_on_signals;
use vmrun_pod::state::{self, PodRecord, StateStore};

use crate::config::Config;
use crate::prepare::prepare;

/// The detached supervisor's binary, found beside `vmrun`.
const SUPERVISOR: &str = "vmrun-supervisor";
/// How long a supervisor whose pod failed to start may take to tear down
/// what it made (a pod VM is killed after 5 s) before `run -d` gives up
/// waiting and removes the pod's directory anyway.
const SUPERVISOR_TEARDOWN: Duration = Duration::from_secs(60);

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

pub async fn run(config: &Config, args: RunArgs) -> anyhow::Result<i32> {
    let uid = random_uid();
    let pod = prepare(config, &args.manifest, args.runtime.as_deref(), &uid).await?;
    let name = pod.plan.name.clone();
    let dir = claim_pod_dir(config, &name)?;
    if args.detach {
        if let Err(e) = detach(&args, &pod, &dir) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        return Ok(0);
    }
    let record = PodRecord::pending(&pod.plan, pod.runtime_name());
    let prepared = pod.into_runnable();
    let store = Arc::new(StateStore::create(dir.clone(), record)?);
    let stop = CancellationToken::new();
    let received = stop_on_signals(stop.clone())?;
    let opts = RunOptions {
        backoff_base: args.restart_backoff,
        network: prepared.network.clone(),
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

/// Hands the pod to a new `vmrun-supervisor` and waits for its word that
/// the sandbox exists (or why not).
fn detach(args: &RunArgs, pod: &PreparedPod, dir: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let supervisor = exe.with_file_name(SUPERVISOR);
    if !supervisor.is_file() {
        bail!(
            "{} not found beside {} (build the workspace: cargo build)",
            supervisor.display(),
            exe.display()
        );
    }
    pod.write(&dir.join(PREPARED_FILE))?;
    let log = std::fs::File::create(dir.join("supervisor.log"))?;
    let mut cmd = std::process::Command::new(&supervisor);
    cmd.arg(dir)
        .arg("--ready-fd")
        .arg(vmrun_pod::detach::READY_FD.to_string())
        .arg("--restart-backoff-ms")
        .arg(args.restart_backoff.as_millis().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let (mut child, ready_r) = vmrun_pod::detach::spawn_with_ready_pipe(&mut cmd)
        .with_context(|| format!("starting the pod supervisor {}", supervisor.display()))?;
    let mut answer = String::new();
    std::fs::File::from(ready_r).read_to_string(&mut answer)?;
    let answer = answer.trim();
    if answer == "ok" {
        println!("{}", pod.plan.name);
        return Ok(());
    }
    // The supervisor tears down what it made before it exits; the pod's
    // directory goes once it has, so the removal cannot race the teardown.
    if let Ok(pidfd) = vmrun_pod::native::pidfd_open(child.id() as i32) {
        let _ = vmrun_pod::native::poll_exit(&pidfd, Some(SUPERVISOR_TEARDOWN));
    }
    let _ = child.try_wait();
    if answer.is_empty() {
        // The pod's directory goes away with the failed pod: say here what
        // the supervisor said.
        let log = std::fs::read_to_string(dir.join("supervisor.log")).unwrap_or_default();
        bail!(
            "the pod supervisor (pid {}) exited before the pod started{}",
            child.id(),
            match log.trim() {
                "" => String::new(),
                said => format!(": {said}"),
            }
        );
    }
    bail!("{answer}")
}
