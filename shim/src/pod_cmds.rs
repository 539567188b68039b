//! `vmrun ps | logs | exec | stop | rm`: working on pods through their on-disk
//! record, from any process.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use vmrun_pod::state::{self, ContainerPhase, PodRecord};

use crate::config::Config;

#[derive(clap::Args)]
pub struct LogsArgs {
    pub pod: String,
    /// The container; all containers (prefixed) when omitted.
    pub container: Option<String>,
    /// Keep printing new output until the pod ends.
    #[arg(short, long)]
    pub follow: bool,
}

#[derive(clap::Args)]
pub struct ExecArgs {
    pub pod: String,
    /// The container (default: the pod's first container).
    #[arg(short, long)]
    pub container: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(clap::Args)]
pub struct StopArgs {
    pub pods: Vec<String>,
}

#[derive(clap::Args)]
pub struct RmArgs {
    pub pods: Vec<String>,
    /// Stop the pod first if it runs.
    #[arg(short, long)]
    pub force: bool,
}

fn load(config: &Config, pod: &str) -> anyhow::Result<(PathBuf, PodRecord)> {
    let dir = state::pod_dir(&config.state, pod);
    let record = state::read(&dir)?;
    Ok((dir, record))
}

fn status(record: &PodRecord) -> String {
    let phase = format!("{:?}", record.phase).to_lowercase();
    if matches!(
        record.phase,
        state::PodPhase::Running | state::PodPhase::Pending | state::PodPhase::Stopping
    ) && !state::supervisor_alive(record)
    {
        return "dead (supervisor gone)".into();
    }
    match record.exit_code {
        Some(code) if !state::supervisor_alive(record) => format!("{phase} ({code})"),
        _ => phase,
    }
}

pub fn ps(config: &Config) -> anyhow::Result<()> {
    let pods = state::list(&config.state)?;
    println!(
        "{:<24} {:<8} {:<22} {:<7} {:<9} CREATED",
        "NAME", "RUNTIME", "STATUS", "READY", "RESTARTS"
    );
    for p in pods {
        let app: Vec<_> = p.containers.values().filter(|c| !c.init).collect();
        let ready = app
            .iter()
            .filter(|c| c.ready && c.phase == ContainerPhase::Running)
            .count();
        let restarts: u32 = p.containers.values().map(|c| c.restarts).sum();
        println!(
            "{:<24} {:<8} {:<22} {:<7} {:<9} {}",
            p.name,
            p.runtime,
            status(&p),
            format!("{ready}/{}", app.len()),
            restarts,
            p.created
        );
    }
    Ok(())
}

/// The newest log file of a container.
fn latest_log(dir: &Path, container: &str) -> Option<PathBuf> {
    let logs = dir.join("logs").join(container);
    std::fs::read_dir(logs)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let attempt: u32 = e.file_name().to_str()?.strip_suffix(".log")?.parse().ok()?;
            Some((attempt, e.path()))
        })
        .max_by_key(|(a, _)| *a)
        .map(|(_, p)| p)
}

fn print_records(text: &str, prefix: Option<&str>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for line in text.lines() {
        if let Some(r) = vmrun_pod::logs::parse_record(line) {
            if let Some(p) = prefix {
                write!(out, "[{p}] ")?;
            }
            out.write_all(r.content.as_bytes())?;
            if !r.partial {
                out.write_all(b"\n")?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

pub async fn logs(config: &Config, args: LogsArgs) -> anyhow::Result<()> {
    let (dir, record) = load(config, &args.pod)?;
    let names: Vec<String> = match &args.container {
        Some(c) if record.containers.contains_key(c) => vec![c.clone()],
        Some(c) => bail!(
            "pod {:?} has no container {c:?} (it has: {})",
            args.pod,
            record
                .containers
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => record.containers.keys().cloned().collect(),
    };
    let prefix = names.len() > 1;
    // Offsets of what was printed, per container log file.
    let mut printed: Vec<(String, Option<PathBuf>, u64)> =
        names.into_iter().map(|n| (n, None, 0)).collect();
    let inotify = if args.follow {
        Some(nix::sys::inotify::Inotify::init(
            nix::sys::inotify::InitFlags::IN_CLOEXEC,
        )?)
    } else {
        None
    };
    let mut watched = std::collections::HashSet::new();
    loop {
        for (name, current, offset) in printed.iter_mut() {
            let Some(path) = latest_log(&dir, name) else {
                continue;
            };
            if current.as_ref() != Some(&path) {
                *current = Some(path.clone());
                *offset = 0;
            }
            let mut file =
                std::fs::File::open(&path).with_context(|| path.display().to_string())?;
            file.seek(SeekFrom::Start(*offset))?;
            let mut text = String::new();
            file.read_to_string(&mut text)?;
            // Only whole records: a writer may be mid-line.
            let complete = text.rfind('\n').map(|i| i + 1).unwrap_or(0);
            print_records(&text[..complete], prefix.then_some(name.as_str()))?;
            *offset += complete as u64;
            if let Some(ino) = &inotify {
                if watched.insert(path.clone()) {
                    ino.add_watch(&path, nix::sys::inotify::AddWatchFlags::IN_MODIFY)?;
                }
                let logs_dir = dir.join("logs").join(name.as_str());
                if watched.insert(logs_dir.clone()) {
                    ino.add_watch(&logs_dir, nix::sys::inotify::AddWatchFlags::IN_CREATE)?;
                }
            }
        }
        let Some(ino) = &inotify else { return Ok(()) };
        let record = state::read(&dir)?;
        if !state::supervisor_alive(&record) {
            return Ok(());
        }
        // Wake on new output, or every second to notice the pod ending.
        let mut fds = [nix::poll::PollFd::new(
            ino.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16))? > 0 {
            let _ = ino.read_events();
        }
    }
}

pub fn exec(config: &Config, args: ExecArgs) -> anyhow::Result<i32> {
    let (_, record) = load(config, &args.pod)?;
    let name = match &args.container {
        Some(c) => c.clone(),
        None => record
            .containers
            .values()
            .find(|c| !c.init)
            .map(|c| c.name.clone())
            .context("pod has no containers")?,
    };
    let container = record
        .containers
        .get(&name)
        .with_context(|| format!("pod {:?} has no container {name:?}", args.pod))?;
    let target = match (&container.phase, &container.exec_target) {
        (ContainerPhase::Running, Some(t)) if state::supervisor_alive(&record) => t.clone(),
        _ => bail!("container {name:?} of pod {:?} is not running", args.pod),
    };
    if target["runtime"] == "wasm" {
        bail!("exec in {name:?}: {}", vmrun_pod::wasm::NO_EXEC);
    }
    if target["runtime"] == "vm" {
        return vmrun_pod::vm::exec_to_terminal(&target, &args.command)
            .map_err(|e| anyhow::anyhow!("exec in {name:?}: {e}"));
    }
    let dup =
        |fd: std::os::fd::BorrowedFd| -> anyhow::Result<OwnedFd> { Ok(fd.try_clone_to_owned()?) };
    let stdio = vmrun_container::Stdio {
        stdin: Some(dup(std::io::stdin().as_fd())?),
        stdout: Some(dup(std::io::stdout().as_fd())?),
        stderr: Some(dup(std::io::stderr().as_fd())?),
    };
    let process = vmrun_pod::native::spawn_exec(&target, &args.command, stdio)
        .map_err(|e| anyhow::anyhow!("exec in {name:?}: {e}"))?;
    let status = process
        .wait()
        .map_err(|e| anyhow::anyhow!("exec in {name:?}: {e}"))?;
    Ok(status.code)
}

/// Sends SIGTERM to the pod's supervisor and waits for it to finish stopping.
fn stop_one(config: &Config, pod: &str) -> anyhow::Result<()> {
    let (_, record) = load(config, pod)?;
    if !state::supervisor_alive(&record) {
        bail!("pod {pod:?} is not running");
    }
    let pid = record.supervisor_pid as i32;
    // Open the pidfd first so the wait cannot miss the exit.
    let pidfd = vmrun_pod::native::pidfd_open(pid)
        .with_context(|| format!("pod {pod:?}: supervisor {pid}"))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .with_context(|| format!("signalling the supervisor of {pod:?}"))?;
    // The supervisor runs preStop hooks and the grace period; wait for all of it.
    vmrun_pod::native::poll_exit(&pidfd, None)
        .with_context(|| format!("waiting for {pod:?} to stop"))?;
    Ok(())
}

pub fn stop(config: &Config, args: StopArgs) -> anyhow::Result<()> {
    for pod in &args.pods {
        stop_one(config, pod)?;
        println!("{pod}");
    }
    Ok(())
}

/// Undoes what a pod whose supervisor died (SIGKILL, a crash) left: its
/// network, processes (a pod VM's VMM), cgroups and mounts. The directory
/// stays when something could not be undone, so `vmrun rm` can be retried.
fn remove_orphan(config: &Config, dir: &Path, record: &PodRecord) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    if !record.pod_ips.is_empty() {
        if let Some(network) = config.network_settings() {
            let detached = vmrun_cni::detach_orphan(&network, dir, |netns| {
                vmrun_pod::pod_network::attachment(
                    &record.uid,
                    &record.namespace,
                    &record.name,
                    netns,
                    // DEL takes the mappings from ADD's cached entry.
                    &[],
                )
            });
            if let Err(e) = detached {
                errors.push(e.to_string());
            }
        }
    }
    let cgroup = format!("{}/{}", vmrun_pod::native::CGROUP_PARENT, record.uid);
    if let Err(e) = vmrun_pod::leftovers::remove(dir, &cgroup) {
        errors.push(e);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("; "))
    }
}

pub fn rm(config: &Config, args: RmArgs) -> anyhow::Result<()> {
    for pod in &args.pods {
        let (dir, record) = load(config, pod)?;
        if state::supervisor_alive(&record) {
            if !args.force {
                bail!("pod {pod:?} is running; stop it first or use `vmrun rm -f`");
            }
            stop_one(config, pod)?;
        } else if matches!(
            record.phase,
            state::PodPhase::Running | state::PodPhase::Pending | state::PodPhase::Stopping
        ) {
            remove_orphan(config, &dir, &record)
                .with_context(|| format!("pod {pod:?}: its supervisor died; cleaning up"))?;
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        println!("{pod}");
    }
    Ok(())
}
