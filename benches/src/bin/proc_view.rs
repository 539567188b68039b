//! What the /proc view costs: native pod start with and without it
//! (interleaved runs), and the latency of reading /proc/meminfo from inside a
//! container (served by `vmrun-procview`) against the host's own.
//!
//! `cargo run --release -p vmrun-benches --bin proc_view -- [RUNS] [READS]` (as root).

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::unistd::{fork, ForkResult};
use vmrun_benches::{import_busybox, ms, summarize, time_to_first_line, Summary};

fn manifest(name: &str, view: bool, command: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  annotations:\n    vmrun.io/proc-view: \"{view}\"\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: localhost/busybox:latest\n    imagePullPolicy: Never\n    command: {command}\n    resources:\n      limits: {{cpu: 1, memory: 64Mi}}\n"
    )
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(50);
    let reads: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let work = tempfile::Builder::new().prefix("vmrun-bench").tempdir()?;
    let vmrun = vmrun_tests::pod::vmrun_release_bin();
    let root = work.path().join("root");
    let state = work.path().join("state");
    import_busybox(vmrun, &root, work.path())?;
    let vmrun_cmd = || {
        let mut c = Command::new(vmrun);
        c.arg("--root").arg(&root).arg("--state").arg(&state);
        c
    };

    let with = work.path().join("with.yaml");
    let without = work.path().join("without.yaml");
    std::fs::write(&with, manifest("with", true, "[echo, ready]"))?;
    std::fs::write(&without, manifest("without", false, "[echo, ready]"))?;
    // The first pod with the view starts the host's daemon: not measured.
    time_to_first_line(vmrun_cmd().args(["run"]).arg(&with))?;
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        on.push(time_to_first_line(vmrun_cmd().args(["run"]).arg(&with))?);
        off.push(time_to_first_line(vmrun_cmd().args(["run"]).arg(&without))?);
    }
    let (on, off) = (summarize(&on), summarize(&off));
    println!("native pod start, manifest to first output line, {runs} runs each, interleaved");
    println!(
        "{:<18} {:>9} {:>9} {:>9}",
        "", "p50 ms", "p99 ms", "mean ms"
    );
    for (name, s) in [("with /proc view", on), ("without", off)] {
        println!(
            "{name:<18} {:>9.1} {:>9.1} {:>9.1}",
            ms(s.p50),
            ms(s.p99),
            ms(s.mean)
        );
    }
    println!(
        "with/without ratio: p50 {:.2}x, p99 {:.2}x",
        ms(on.p50) / ms(off.p50),
        ms(on.p99) / ms(off.p99)
    );

    let reader = work.path().join("reader.yaml");
    std::fs::write(&reader, manifest("reader", true, "[sleep, \"3605\"]"))?;
    let status = vmrun_cmd().args(["run", "-d"]).arg(&reader).status()?;
    if !status.success() {
        bail!("vmrun run -d reader failed");
    }
    let result = measure_reads(&state, reads);
    let _ = vmrun_cmd().args(["stop", "reader"]).status();
    let _ = vmrun_cmd().args(["rm", "reader"]).status();
    let (inside, outside) = result?;
    println!("/proc/meminfo read (open, read all, close), {reads} reads each");
    println!("{:<18} {:>9} {:>9}", "", "p50 µs", "p99 µs");
    for (name, s) in [("inside (view)", inside), ("outside (host)", outside)] {
        println!(
            "{name:<18} {:>9.1} {:>9.1}",
            ms(s.p50) * 1000.0,
            ms(s.p99) * 1000.0
        );
    }
    println!(
        "inside/outside ratio: p50 {:.1}x",
        ms(inside.p50) / ms(outside.p50)
    );
    Ok(())
}

/// The running reader pod's (pid, uid), once its container runs.
fn reader_container(state: &Path) -> anyhow::Result<(i32, String)> {
    let record = vmrun_pod::state::pod_dir(state, "reader").join("pod.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read(&record) {
            let r: serde_json::Value = serde_json::from_slice(&text)?;
            if let (Some(pid), Some(uid)) =
                (r["containers"]["c"]["pid"].as_i64(), r["uid"].as_str())
            {
                return Ok((pid as i32, uid.to_string()));
            }
        }
        if Instant::now() > deadline {
            bail!("the reader pod never ran: {}", record.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn time_reads(path: &str, reads: usize) -> Vec<Duration> {
    let mut buf = Vec::with_capacity(8192);
    (0..reads)
        .map(|_| {
            buf.clear();
            let start = Instant::now();
            if let Ok(mut f) = std::fs::File::open(path) {
                let _ = f.read_to_end(&mut buf);
            }
            start.elapsed()
        })
        .collect()
}

/// p50/p99 of reading /proc/meminfo as a process of the reader container
/// (in its cgroups and mount namespace: a forked child joins them) and as
/// the host.
fn measure_reads(state: &Path, reads: usize) -> anyhow::Result<(Summary, Summary)> {
    let (pid, uid) = reader_container(state)?;
    let (rx, tx) = nix::unistd::pipe()?;
    // SAFETY: this program has one thread (it started none), so the child
    // may run Rust code after fork.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(rx);
            let code = match read_inside(pid, &uid, reads) {
                Ok(samples) => {
                    let text: Vec<String> =
                        samples.iter().map(|d| d.as_nanos().to_string()).collect();
                    let mut tx = std::fs::File::from(tx);
                    let _ = tx.write_all(text.join("\n").as_bytes());
                    0
                }
                Err(e) => {
                    eprintln!("inside the container: {e:#}");
                    1
                }
            };
            std::process::exit(code);
        }
        ForkResult::Parent { child } => {
            drop(tx);
            let mut text = String::new();
            std::fs::File::from(rx).read_to_string(&mut text)?;
            nix::sys::wait::waitpid(child, None)?;
            let inside: Vec<Duration> = text
                .lines()
                .filter_map(|l| l.parse().ok())
                .map(Duration::from_nanos)
                .collect();
            if inside.len() != reads {
                bail!("the reader inside the container failed");
            }
            let outside = time_reads("/proc/meminfo", reads);
            Ok((summarize(&inside), summarize(&outside)))
        }
    }
}

fn read_inside(pid: i32, uid: &str, reads: usize) -> anyhow::Result<Vec<Duration>> {
    let cg = Path::new("/sys/fs/cgroup");
    let rel = format!("vmrun/{uid}/c/cgroup.procs");
    if cg.join("cgroup.controllers").exists() {
        std::fs::write(cg.join(&rel), "0").context("join the container's cgroup")?;
    } else {
        for entry in std::fs::read_dir(cg)?.flatten() {
            let procs = entry.path().join(&rel);
            if procs.exists() {
                std::fs::write(&procs, "0").with_context(|| format!("join {}", procs.display()))?;
            }
        }
    }
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNS)
        .context("enter the container's mount namespace")?;
    let first = std::fs::read_to_string("/proc/meminfo")?;
    if !first.starts_with("MemTotal:          65536 kB") {
        bail!(
            "not the container's view: {}",
            first.lines().next().unwrap_or("")
        );
    }
    Ok(time_reads("/proc/meminfo", reads))
}
