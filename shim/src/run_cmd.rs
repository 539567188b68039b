//! `vmrun run`: a pod in the foreground (the CLI process supervises it) or, with
//! `-d`, under a detached `vmrun supervise` process.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;
use vmrun_image::{ImageStore, PullPolicy as ImagePullPolicy, PullProgress};
use vmrun_pod::controller::{run_pod, ResolvedImage, RunOptions};
use vmrun_pod::native::NativeRuntime;
use vmrun_pod::plan::{PodPlan, PullPolicy};
use vmrun_pod::runtime::Runtime;
use vmrun_pod::spec::ImageDefaults;
use vmrun_pod::state::{self, ContainerPhase, ContainerRecord, PodPhase, PodRecord, StateStore};
use vmrun_pod::vm::VmRuntime;

use crate::config::Config;

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
    #[arg(long)]
    manifest: PathBuf,
    #[arg(long)]
    runtime: String,
    #[arg(long)]
    uid: String,
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

struct Prepared {
    plan: Arc<PodPlan>,
    images: Arc<HashMap<String, ResolvedImage>>,
    runtime: Arc<dyn Runtime>,
}

fn random_uid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| format!("{:x}", std::process::id()))
}

/// Picks the runtime: the flag, else the pod's runtimeClassName, else native.
fn select_runtime(flag: Option<&str>, class: Option<&str>) -> anyhow::Result<&'static str> {
    let (name, source) = match (flag, class) {
        (Some(f), _) => (f, "--runtime"),
        (None, Some(c)) => (c, "spec.runtimeClassName"),
        (None, None) => return Ok("native"),
    };
    match name {
        "native" | "runc" => Ok("native"),
        "vm" => Ok("vm"),
        "wasm" => bail!(
            "{source}: runtime {name:?} is not available yet in this version of vmrun (use native)"
        ),
        other => bail!("{source}: unknown runtime {other:?} (expected native, vm or wasm)"),
    }
}

async fn prepare(
    config: &Config,
    manifest: &Path,
    runtime_flag: Option<&str>,
    uid: &str,
    pull: bool,
) -> anyhow::Result<Prepared> {
    let manifest = vmrun_pod::manifest::load(manifest)?;
    let node = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let plan = vmrun_pod::plan::plan(&manifest, uid, &node)?;
    let runtime_name = select_runtime(runtime_flag, plan.runtime_class.as_deref())?;
    let store = ImageStore::open(&config.root, config.registries.clone())?;
    let progress: Box<dyn PullProgress> = if pull {
        Box::new(crate::image_cmd::TerminalProgress::new())
    } else {
        Box::new(vmrun_image::NoProgress)
    };
    let mut images = HashMap::new();
    let mut image_disks = std::collections::BTreeMap::new();
    for c in plan.all_containers() {
        if images.contains_key(&c.image) {
            continue;
        }
        let policy = match (pull, c.pull_policy) {
            (false, _) | (_, PullPolicy::Never) => ImagePullPolicy::Never,
            (true, PullPolicy::Always) => ImagePullPolicy::Always,
            (true, PullPolicy::IfNotPresent) => ImagePullPolicy::IfNotPresent,
        };
        let image = store
            .ensure(&c.image, policy, progress.as_ref())
            .await
            .with_context(|| format!("container {:?}: image {:?}", c.name, c.image))?;
        if runtime_name == "vm" {
            // A guest reads the image from a block device: built once per image.
            let disk = store
                .block_image(&image)
                .with_context(|| format!("container {:?}: image {:?}", c.name, c.image))?;
            image_disks.insert(c.image.clone(), disk);
        }
        let cfg = &image.config;
        images.insert(
            c.image.clone(),
            ResolvedImage {
                defaults: ImageDefaults {
                    entrypoint: cfg.entrypoint.clone(),
                    cmd: cfg.cmd.clone(),
                    env: cfg.env.clone(),
                    working_dir: cfg.working_dir.clone(),
                    user: cfg.user.clone(),
                },
                layers: image.layers.clone(),
            },
        );
    }
    let runtime: Arc<dyn Runtime> = match runtime_name {
        "native" => Arc::new(NativeRuntime {
            state_root: config.state.clone(),
            pids_limit: config.pids_limit,
        }),
        "vm" => Arc::new(VmRuntime {
            state_root: config.state.clone(),
            assets: config.vm_assets(),
            image_disks,
            pids_limit: config.pids_limit,
            max_vcpus: config.vm.max_vcpus,
            boot_timeout: VmRuntime::boot_timeout_from_env(),
        }),
        other => bail!("runtime {other:?} is not available yet"),
    };
    Ok(Prepared {
        plan: Arc::new(plan),
        images: Arc::new(images),
        runtime,
    })
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
    let prepared = prepare(config, &args.manifest, args.runtime.as_deref(), &uid, true).await?;
    let name = prepared.plan.name.clone();
    let dir = claim_pod_dir(config, &name)?;
    if args.detach {
        return detach(config, &args, &prepared, &uid, &dir);
    }
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

fn detach(
    config: &Config,
    args: &RunArgs,
    prepared: &Prepared,
    uid: &str,
    dir: &Path,
) -> anyhow::Result<i32> {
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let log = std::fs::File::create(dir.join("supervisor.log"))?;
    let exe = std::env::current_exe()?;
    let manifest = std::fs::canonicalize(&args.manifest)?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--root")
        .arg(&config.root)
        .arg("--state")
        .arg(&config.state);
    if let Some(path) = &config.source {
        cmd.arg("--config").arg(path);
    }
    cmd.arg("supervise")
        .arg("--manifest")
        .arg(&manifest)
        .arg("--runtime")
        .arg(prepared.runtime.name())
        .arg("--uid")
        .arg(uid)
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
        println!("{}", prepared.plan.name);
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
    let prepared = match prepare(
        config,
        &args.manifest,
        Some(&args.runtime),
        &args.uid,
        false,
    )
    .await
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
