//! The pod lifecycle, runtime-independent: init containers in order, then the
//! app containers with their restart policy and back-off, postStart/preStop hooks,
//! startup/liveness/readiness probes, and graceful termination.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::logs::{self, LogTarget};
use crate::plan::{ContainerPlan, PodPlan, ProbePlan, RestartPolicy};
use crate::probe::run_handler;
use crate::runtime::{ExitInfo, Launch, Running, Runtime, RuntimeError, Sandbox};
use crate::spec::ImageDefaults;
use crate::state::{ContainerPhase, PodPhase, StateStore};

/// A container image as the controller needs it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ResolvedImage {
    pub defaults: ImageDefaults,
    pub layers: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// First restart delay; doubles per restart up to `backoff_max` (kubelet: 10 s, 5 min).
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Echo container output to this process's stdout/stderr with a `[name]` prefix.
    pub terminal: bool,
    /// Print lifecycle events (started, exited, restarting) to stderr.
    pub events: bool,
    /// The node's CNI network the pod joins (not with hostNetwork); None:
    /// loopback only.
    pub network: Option<vmrun_cni::NetworkSettings>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            terminal: true,
            events: true,
            network: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodOutcome {
    pub phase: PodPhase,
    pub exit_code: i32,
    /// Why the pod failed, when it did.
    pub message: Option<String>,
    /// The pod ended because stop was requested.
    pub stopped: bool,
}

/// The pod's exit code when its sandbox died (no container exit to pass on).
pub const SANDBOX_LOST_EXIT: i32 = 1;
/// Container reason when the sandbox died under it.
pub const SANDBOX_LOST_REASON: &str = "SandboxLost";

struct Ctx {
    plan: Arc<PodPlan>,
    images: Arc<HashMap<String, ResolvedImage>>,
    sandbox: Arc<dyn Sandbox>,
    state: Arc<StateStore>,
    opts: RunOptions,
}

impl Ctx {
    fn event(&self, container: &str, message: &str) {
        tracing::info!(pod = %self.plan.name, container, "{message}");
        if self.opts.events {
            eprintln!("vmrun: {}/{container}: {message}", self.plan.name);
        }
    }
}

enum Outcome {
    Succeeded,
    Failed(ExitInfo),
    StartError(String),
    /// The sandbox died under the container (its VMM was killed): the pod fails.
    SandboxLost(String),
    Stopped,
}

/// Why an attempt to run a container ended without an exit to act on.
enum AttemptError {
    Start(String),
    SandboxLost(String),
}

impl Outcome {
    /// Ends the pod: the other containers are stopped.
    fn is_fatal(&self) -> bool {
        matches!(self, Outcome::StartError(_) | Outcome::SandboxLost(_))
    }
}

/// Runs a pod until it completes or `stop` is cancelled, then removes the sandbox.
pub async fn run_pod(
    plan: Arc<PodPlan>,
    images: Arc<HashMap<String, ResolvedImage>>,
    runtime: Arc<dyn Runtime>,
    state: Arc<StateStore>,
    opts: RunOptions,
    stop: CancellationToken,
) -> PodOutcome {
    let create_plan = plan.clone();
    let created = tokio::task::spawn_blocking(move || runtime.create_sandbox(&create_plan)).await;
    let sandbox = match created {
        Ok(Ok(sandbox)) => sandbox,
        Ok(Err(e)) => return failed(&state, 1, e.to_string()),
        Err(e) => return failed(&state, 1, format!("creating the sandbox panicked: {e}")),
    };
    let network = match &opts.network {
        Some(settings) => {
            match crate::pod_network::join(settings, &plan, state.dir(), &sandbox).await {
                Ok(network) => network,
                Err(e) => {
                    let _ = tokio::task::spawn_blocking(move || sandbox.destroy()).await;
                    return failed(&state, 1, e);
                }
            }
        }
        None => None,
    };
    if let Some(network) = &network {
        let ips = network.ips.iter().map(|ip| ip.to_string()).collect();
        let _ = state.update(|r| r.pod_ips = ips);
    }
    let _ = state.update(|r| r.phase = PodPhase::Running);
    let ctx = Arc::new(Ctx {
        plan: plan.clone(),
        images,
        sandbox: sandbox.clone(),
        state: state.clone(),
        opts,
    });
    // Cancelled by the user's stop, or by a fatal error in one container to stop the rest.
    let pod_stop = stop.child_token();
    // The user's stop starts the grace period: the pod is stopping from
    // then on (what `vmrun ps` shows), not only once its containers ended.
    let mark_stopping = {
        let (stop, state) = (stop.clone(), state.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            let _ = state.update(|r| {
                if r.phase == PodPhase::Running {
                    r.phase = PodPhase::Stopping;
                }
            });
        })
    };
    let mut failure: Option<(i32, String)> = None;

    for c in &plan.init_containers {
        match supervise(ctx.clone(), c.clone(), true, pod_stop.clone()).await {
            Outcome::Succeeded => continue,
            Outcome::Failed(exit) => {
                failure = Some((
                    exit.code,
                    format!("init container {:?} failed: {}", c.name, describe(&exit)),
                ));
                break;
            }
            Outcome::StartError(message) => {
                failure = Some((127, message));
                break;
            }
            Outcome::SandboxLost(message) => {
                failure = Some((SANDBOX_LOST_EXIT, message));
                break;
            }
            Outcome::Stopped => break,
        }
    }

    if failure.is_none() && !pod_stop.is_cancelled() {
        let tasks: Vec<(String, JoinHandle<Outcome>)> = plan
            .containers
            .iter()
            .map(|c| {
                let ctx = ctx.clone();
                let stop = pod_stop.clone();
                let c2 = c.clone();
                (
                    c.name.clone(),
                    tokio::spawn(async move {
                        let outcome = supervise(ctx, c2, false, stop.clone()).await;
                        if outcome.is_fatal() {
                            stop.cancel();
                        }
                        outcome
                    }),
                )
            })
            .collect();
        for (name, task) in tasks {
            let outcome = task.await.unwrap_or_else(|e| {
                Outcome::StartError(format!("container {name:?}: supervisor panicked: {e}"))
            });
            if failure.is_some() {
                continue;
            }
            match outcome {
                Outcome::Failed(exit) => {
                    failure = Some((
                        exit.code,
                        format!("container {name:?} failed: {}", describe(&exit)),
                    ))
                }
                Outcome::StartError(message) => failure = Some((127, message)),
                Outcome::SandboxLost(message) => failure = Some((SANDBOX_LOST_EXIT, message)),
                Outcome::Succeeded | Outcome::Stopped => {}
            }
        }
    }

    mark_stopping.abort();
    let _ = state.update(|r| r.phase = PodPhase::Stopping);
    // Detached while the sandbox still holds the namespace, as CRI does.
    let detach_error = match network {
        Some(network) => crate::pod_network::leave(network).await.err(),
        None => None,
    };
    let destroy = tokio::task::spawn_blocking(move || sandbox.destroy()).await;
    let destroy_error = match destroy {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(e) => Some(format!("removing the sandbox panicked: {e}")),
    };
    let destroy_error = match (detach_error, destroy_error) {
        (Some(a), Some(b)) => Some(format!("{a}; {b}")),
        (a, b) => a.or(b),
    };
    let stopped = stop.is_cancelled();
    let (phase, exit_code, mut message) = match failure {
        Some((code, message)) => (
            PodPhase::Failed,
            if code == 0 { 1 } else { code },
            Some(message),
        ),
        None => (PodPhase::Succeeded, 0, None),
    };
    if let Some(e) = destroy_error {
        message = Some(match message {
            Some(m) => format!("{m}; {e}"),
            None => e,
        });
    }
    let _ = state.update(|r| {
        r.phase = phase;
        r.exit_code = Some(exit_code);
        r.message = message.clone();
    });
    PodOutcome {
        phase,
        exit_code,
        message,
        stopped,
    }
}

fn failed(state: &StateStore, code: i32, message: String) -> PodOutcome {
    let _ = state.update(|r| {
        r.phase = PodPhase::Failed;
        r.exit_code = Some(code);
        r.message = Some(message.clone());
    });
    PodOutcome {
        phase: PodPhase::Failed,
        exit_code: code,
        message: Some(message),
        stopped: false,
    }
}

fn describe(exit: &ExitInfo) -> String {
    match (exit.oom_killed, exit.signal) {
        (true, _) => format!("OOMKilled (exit code {})", exit.code),
        (false, Some(sig)) => format!("killed by signal {sig} (exit code {})", exit.code),
        (false, None) => format!("exit code {}", exit.code),
    }
}

/// Runs one container through its restarts until it is done for good.
async fn supervise(
    ctx: Arc<Ctx>,
    c: ContainerPlan,
    init: bool,
    stop: CancellationToken,
) -> Outcome {
    let mut restarts: u32 = 0;
    let mut backoff = ctx.opts.backoff_base;
    loop {
        if stop.is_cancelled() {
            return Outcome::Stopped;
        }
        let started = Instant::now();
        let (exit, stopped) = match run_attempt(&ctx, &c, restarts, &stop).await {
            Ok(result) => result,
            Err(AttemptError::Start(message)) => {
                ctx.state.container(&c.name, |r| {
                    r.phase = ContainerPhase::Waiting;
                    r.reason = Some("StartError".into());
                });
                return Outcome::StartError(message);
            }
            Err(AttemptError::SandboxLost(message)) => {
                ctx.event(&c.name, &message);
                return Outcome::SandboxLost(message);
            }
        };
        if stopped {
            return Outcome::Stopped;
        }
        let restart = match ctx.plan.restart_policy {
            // Init containers never restart after success, whatever the policy.
            RestartPolicy::Always => !init || !exit.success(),
            RestartPolicy::OnFailure => !exit.success(),
            RestartPolicy::Never => false,
        };
        if !restart {
            return if exit.success() {
                Outcome::Succeeded
            } else {
                Outcome::Failed(exit)
            };
        }
        // The kubelet forgets the back-off after a container ran well for 10 minutes.
        if started.elapsed() > Duration::from_secs(600) {
            backoff = ctx.opts.backoff_base;
        }
        restarts += 1;
        ctx.event(
            &c.name,
            &format!(
                "{}; restarting in {:?} (restart {restarts})",
                describe(&exit),
                backoff
            ),
        );
        ctx.state.container(&c.name, |r| {
            r.phase = ContainerPhase::Waiting;
            r.restarts = restarts;
            r.reason = Some(if exit.success() {
                "Completed".into()
            } else {
                "CrashLoopBackOff".into()
            });
        });
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return Outcome::Stopped,
        }
        backoff = (backoff * 2).min(ctx.opts.backoff_max);
    }
}

type WaitHandle = JoinHandle<Result<ExitInfo, RuntimeError>>;

/// One start of a container: returns its exit and whether we stopped it on request.
async fn run_attempt(
    ctx: &Arc<Ctx>,
    c: &ContainerPlan,
    attempt: u32,
    stop: &CancellationToken,
) -> Result<(ExitInfo, bool), AttemptError> {
    match start_and_supervise(ctx, c, attempt, stop).await {
        Ok(ended) => ended,
        // A start that failed because the sandbox is gone says so.
        Err(message) => Err(match ctx.sandbox.lost() {
            Some(why) => AttemptError::SandboxLost(why),
            None => AttemptError::Start(message),
        }),
    }
}

/// [`run_attempt`] with start failures as `Err`, and sandbox loss inside `Ok`.
async fn start_and_supervise(
    ctx: &Arc<Ctx>,
    c: &ContainerPlan,
    attempt: u32,
    stop: &CancellationToken,
) -> Result<Result<(ExitInfo, bool), AttemptError>, String> {
    let image = ctx.images.get(&c.image).cloned().ok_or_else(|| {
        format!(
            "container {:?}: image {:?} was not resolved",
            c.name, c.image
        )
    })?;
    let prefix = ctx.opts.terminal.then(|| c.name.clone());
    let log = logs::log_path(ctx.state.dir(), &c.name, attempt);
    let target = LogTarget::create(&log, prefix).map_err(|e| format!("{}: {e}", log.display()))?;
    let logs::OutputPipes {
        stdout: out_w,
        stderr: err_w,
        pumps,
    } = logs::output_pipes(target).map_err(|e| format!("container {:?}: pipe: {e}", c.name))?;

    let launch = Launch {
        container: c.clone(),
        attempt,
        image: image.defaults,
        layers: image.layers,
        // vmrun run gives a pod VM every image's disk when it boots.
        block_image: None,
        stdout: out_w,
        stderr: err_w,
        // Pod manifests' stdin/tty are not served by `vmrun run`.
        stdin: None,
        tty: false,
    };
    let sandbox = ctx.sandbox.clone();
    let started = tokio::task::spawn_blocking(move || sandbox.start(launch)).await;
    let running: Arc<dyn Running> = match started {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            for p in pumps {
                let _ = p.await;
            }
            return Err(e.to_string());
        }
        Err(e) => return Err(format!("container {:?}: start panicked: {e}", c.name)),
    };
    ctx.state.container(&c.name, |r| {
        r.phase = ContainerPhase::Running;
        r.pid = Some(running.pid());
        r.attempt = attempt;
        r.ready = c.readiness.is_none();
        r.reason = None;
        r.exec_target = Some(running.exec_target());
    });
    ctx.event(&c.name, &format!("started (pid {})", running.pid()));

    let waiter = running.clone();
    let mut wait: WaitHandle = tokio::task::spawn_blocking(move || waiter.wait());
    let mut stopped = false;
    let mut reason: Option<String> = None;
    let mut exit: Option<ExitInfo> = None;

    if let Some(hook) = &c.post_start {
        let hook_run = run_handler(
            ctx.sandbox.clone(),
            running.clone(),
            hook,
            ctx.plan.termination_grace.max(Duration::from_secs(1)),
        );
        tokio::select! {
            result = hook_run => if let Err(why) = result {
                ctx.event(&c.name, &format!("postStart hook failed: {why}; killing the container"));
                reason = Some("FailedPostStartHook".into());
                exit = Some(terminate(ctx, c, &running, &mut wait, false).await);
            },
            result = &mut wait => exit = Some(flatten(result)),
            _ = stop.cancelled() => {
                stopped = true;
                exit = Some(terminate(ctx, c, &running, &mut wait, true).await);
            }
        }
    }

    if exit.is_none() {
        let probes = probe_loop(ctx.clone(), c.clone(), running.clone());
        tokio::pin!(probes);
        exit = Some(tokio::select! {
            result = &mut wait => flatten(result),
            _ = stop.cancelled() => {
                stopped = true;
                terminate(ctx, c, &running, &mut wait, true).await
            }
            why = &mut probes => {
                ctx.event(&c.name, &format!("{why}; killing the container"));
                reason = Some("Unhealthy".into());
                terminate(ctx, c, &running, &mut wait, true).await
            }
        });
    }
    let exit = exit.unwrap_or(ExitInfo {
        code: 255,
        signal: None,
        oom_killed: false,
    });

    let remover = running.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || remover.remove()).await {
        ctx.event(&c.name, &format!("cleanup: {e}"));
    }
    for p in pumps {
        let _ = p.await;
    }
    // A container whose sandbox died has no exit of its own to report.
    let lost = (!stopped).then(|| ctx.sandbox.lost()).flatten();
    if lost.is_some() {
        reason = Some(SANDBOX_LOST_REASON.into());
    }
    ctx.state.container(&c.name, |r| {
        r.phase = ContainerPhase::Terminated;
        r.pid = None;
        r.ready = false;
        r.last_exit = Some(exit);
        r.reason = Some(reason.clone().unwrap_or_else(|| exit.reason().to_string()));
    });
    if let Some(why) = lost {
        return Ok(Err(AttemptError::SandboxLost(why)));
    }
    ctx.event(&c.name, &format!("exited: {}", describe(&exit)));
    Ok(Ok((exit, stopped)))
}

fn flatten(result: Result<Result<ExitInfo, RuntimeError>, tokio::task::JoinError>) -> ExitInfo {
    match result {
        Ok(Ok(exit)) => exit,
        Ok(Err(e)) => {
            tracing::warn!("waiting for a container: {e}");
            ExitInfo {
                code: 255,
                signal: None,
                oom_killed: false,
            }
        }
        Err(e) => {
            tracing::warn!("waiting for a container panicked: {e}");
            ExitInfo {
                code: 255,
                signal: None,
                oom_killed: false,
            }
        }
    }
}

/// preStop (optionally), SIGTERM, the grace period, then SIGKILL.
async fn terminate(
    ctx: &Arc<Ctx>,
    c: &ContainerPlan,
    running: &Arc<dyn Running>,
    wait: &mut WaitHandle,
    pre_stop: bool,
) -> ExitInfo {
    let grace = ctx.plan.termination_grace;
    let deadline = tokio::time::Instant::now() + grace;
    if let (true, Some(hook)) = (pre_stop, &c.pre_stop) {
        let hook_run = run_handler(
            ctx.sandbox.clone(),
            running.clone(),
            hook,
            grace.max(Duration::from_secs(1)),
        );
        tokio::select! {
            result = tokio::time::timeout_at(deadline, hook_run) => match result {
                Ok(Ok(())) => ctx.event(&c.name, "preStop hook ran"),
                Ok(Err(why)) => ctx.event(&c.name, &format!("preStop hook failed: {why}")),
                Err(_) => ctx.event(&c.name, "preStop hook did not finish within the grace period"),
            },
            result = &mut *wait => return flatten(result),
        }
    }
    if let Err(e) = send_signal(running, Signal::SIGTERM).await {
        tracing::warn!(container = %c.name, "SIGTERM: {e}");
    }
    tokio::select! {
        result = &mut *wait => return flatten(result),
        _ = tokio::time::sleep_until(deadline) => {}
    }
    if let Err(e) = send_signal(running, Signal::SIGKILL).await {
        tracing::warn!(container = %c.name, "SIGKILL: {e}");
    }
    flatten(wait.await)
}

/// Signals a container off the async threads: a runtime may block to do it
/// (the vm runtime makes an agent call).
async fn send_signal(running: &Arc<dyn Running>, signal: Signal) -> Result<(), String> {
    let running = running.clone();
    match tokio::task::spawn_blocking(move || running.signal(signal)).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(e) => Err(format!("signalling panicked: {e}")),
    }
}

/// Runs the container's probes; returns only when the container must be killed.
async fn probe_loop(ctx: Arc<Ctx>, c: ContainerPlan, running: Arc<dyn Running>) -> String {
    if let Some(startup) = &c.startup {
        if let Err(why) = until_threshold(&ctx, &running, startup, true).await {
            return format!("startup probe failed: {why}");
        }
    }
    let readiness = async {
        let Some(probe) = &c.readiness else {
            return std::future::pending::<()>().await;
        };
        tokio::time::sleep(probe.initial_delay).await;
        let (mut ok, mut bad) = (0u32, 0u32);
        let mut ready = false;
        loop {
            let result = run_handler(
                ctx.sandbox.clone(),
                running.clone(),
                &probe.handler,
                probe.timeout,
            )
            .await;
            if result.is_ok() {
                ok += 1;
                bad = 0;
            } else {
                bad += 1;
                ok = 0;
            }
            let now_ready = if ready {
                bad < probe.failure_threshold
            } else {
                ok >= probe.success_threshold
            };
            if now_ready != ready {
                ready = now_ready;
                ctx.event(&c.name, if ready { "ready" } else { "not ready" });
                ctx.state.container(&c.name, |r| r.ready = ready);
            }
            tokio::time::sleep(probe.period).await;
        }
    };
    let liveness = async {
        match &c.liveness {
            Some(probe) => match until_threshold(&ctx, &running, probe, false).await {
                Err(why) => format!("liveness probe failed: {why}"),
                Ok(()) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        why = liveness => why,
        _ = readiness => unreachable!("the readiness loop never ends"),
    }
}

/// Startup: probe until it succeeds (Ok) or fails `failure_threshold` times in a row (Err).
/// Liveness: probe forever; Err after `failure_threshold` consecutive failures.
async fn until_threshold(
    ctx: &Arc<Ctx>,
    running: &Arc<dyn Running>,
    probe: &ProbePlan,
    stop_on_success: bool,
) -> Result<(), String> {
    tokio::time::sleep(probe.initial_delay).await;
    let mut failures = 0;
    loop {
        match run_handler(
            ctx.sandbox.clone(),
            running.clone(),
            &probe.handler,
            probe.timeout,
        )
        .await
        {
            Ok(()) if stop_on_success => return Ok(()),
            Ok(()) => failures = 0,
            Err(why) => {
                failures += 1;
                if failures >= probe.failure_threshold {
                    return Err(why);
                }
            }
        }
        tokio::time::sleep(probe.period).await;
    }
}
