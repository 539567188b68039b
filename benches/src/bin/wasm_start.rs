//! Wasm pod start and memory: `vmrun run --runtime wasm` from manifest to
//! the container's first output line, warm (module in the disk cache) and
//! cold (cache emptied before each run), beside a native pod running the
//! same command from busybox, `wasmtime run` of the same module (when the
//! wasmtime CLI is on PATH or in $WASMTIME) and the bare process start of
//! busybox `echo`. Then the host memory (PSS) of a wasm pod's engine with 1
//! and with 50 idle containers, and of the pod's supervisor.
//!
//! `cargo run --release -p vmrun-benches --bin wasm_start -- [RUNS]` (as root).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vmrun_benches::{import_busybox, import_image, ms, summarize, time_to_first_line, Summary};

const WASM_IMAGE: &str = "localhost/wasm-box:latest";

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100);
    let work = tempfile::Builder::new().prefix("vmrun-bench").tempdir()?;
    let vmrun = vmrun_tests::pod::vmrun_release_bin();
    let root = work.path().join("root");
    let state = work.path().join("state");
    import_busybox(vmrun, &root, work.path())?;
    let wasm = vmrun_tests::wasm_programs::wasm_box_p1();
    let module = work.path().join("wasm-box.wasm");
    std::fs::write(&module, wasm)?;
    // An ordinary OCI image whose one layer holds the module at /app.wasm.
    let image = vmrun_tests::images::wasm_image(wasm);
    import_image(vmrun, &root, work.path(), &image, WASM_IMAGE)?;
    println!(
        "module: wasm-box (Rust, wasm32-wasip1), {} KiB",
        wasm.len() / 1024
    );

    let pod = |name: &str, image: &str, runtime_cmd: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: c\n    image: {image}\n    imagePullPolicy: Never\n    {runtime_cmd}\n"
        )
    };
    let wasm_manifest = work.path().join("wasm.yaml");
    std::fs::write(
        &wasm_manifest,
        pod("wasm", WASM_IMAGE, "args: [echo, ready]"),
    )?;
    let native_manifest = work.path().join("native.yaml");
    std::fs::write(
        &native_manifest,
        pod(
            "native",
            "localhost/busybox:latest",
            "command: [echo, ready]",
        ),
    )?;
    let run = |runtime: &str, manifest: &Path| {
        let mut cmd = Command::new(vmrun);
        cmd.arg("--root")
            .arg(&root)
            .arg("--state")
            .arg(&state)
            .args(["run", "--runtime", runtime])
            .arg(manifest);
        cmd
    };
    let cache = root.join("wasm-cache");
    let mut results: Vec<(String, Summary)> = Vec::new();

    let mut cold = Vec::new();
    for _ in 0..runs {
        let _ = std::fs::remove_dir_all(&cache);
        cold.push(time_to_first_line(&mut run("wasm", &wasm_manifest))?);
    }
    results.push(("vmrun wasm, cold".into(), summarize(&cold)));
    let mut warm = Vec::new();
    for _ in 0..runs {
        warm.push(time_to_first_line(&mut run("wasm", &wasm_manifest))?);
    }
    let warm = summarize(&warm);
    results.push(("vmrun wasm, warm".into(), warm));
    let mut native = Vec::new();
    for _ in 0..runs {
        native.push(time_to_first_line(&mut run("native", &native_manifest))?);
    }
    let native = summarize(&native);
    results.push(("vmrun native".into(), native));

    match wasmtime_cli() {
        Some(cli) => {
            let mut samples = Vec::new();
            for _ in 0..runs {
                samples.push(time_to_first_line(
                    Command::new(&cli)
                        .arg("run")
                        .arg(&module)
                        .args(["echo", "ready"]),
                )?);
            }
            results.push(("wasmtime run".into(), summarize(&samples)));
        }
        None => println!("wasmtime run: not measured: no wasmtime CLI on PATH or in $WASMTIME"),
    }
    let busybox_echo = Path::new("/bin/busybox");
    let mut bare = Vec::new();
    for _ in 0..runs {
        bare.push(time_to_first_line(
            Command::new(busybox_echo).args(["echo", "ready"]),
        )?);
    }
    let bare = summarize(&bare);
    results.push(("process (busybox echo)".into(), bare));

    println!("pod start, manifest to first output line, {runs} runs each");
    println!(
        "{:<24} {:>9} {:>9} {:>9}",
        "", "p50 ms", "p99 ms", "mean ms"
    );
    for (name, s) in &results {
        println!(
            "{name:<24} {:>9.2} {:>9.2} {:>9.2}",
            ms(s.p50),
            ms(s.p99),
            ms(s.mean)
        );
    }
    println!(
        "warm wasm over native pod start: p50 {:+.2} ms; over a bare process start: p50 {:+.2} ms",
        ms(warm.p50) - ms(native.p50),
        ms(warm.p50) - ms(bare.p50)
    );

    let mut idle = Vec::new();
    for containers in [1usize, 50] {
        let ((engine, engine_anon), (supervisor, _)) =
            idle_pod_memory(vmrun, &root, &state, work.path(), containers)?;
        println!(
            "idle wasm pod, {containers:>2} containers: engine PSS {:.2} MiB (anonymous {:.2}; {:.3} MiB per container), supervisor PSS {:.2} MiB",
            mib(engine),
            mib(engine_anon),
            mib(engine) / containers as f64,
            mib(supervisor)
        );
        idle.push((containers, engine, supervisor));
    }
    // What one more idle container costs: the engine's own code and heap
    // are paid once per pod, as the supervisor is.
    if let [(n1, e1, s1), (n2, e2, s2)] = idle[..] {
        let extra = (n2 - n1) as f64;
        println!(
            "each further idle container: engine {:.3} MiB, supervisor {:.3} MiB",
            (mib(e2) - mib(e1)) / extra,
            (mib(s2) - mib(s1)) / extra
        );
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn wasmtime_cli() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WASMTIME").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("wasmtime"))
        .find(|p| p.is_file())
}

/// PSS of the engine and the supervisor of a detached pod of `n` idle
/// (sleeping) wasm containers, once all run.
fn idle_pod_memory(
    vmrun: &Path,
    root: &Path,
    state: &Path,
    work: &Path,
    n: usize,
) -> anyhow::Result<((u64, u64), (u64, u64))> {
    let name = format!("idle{n}");
    let mut yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n"
    );
    for i in 0..n {
        yaml += &format!(
            "  - name: c{i}\n    image: {WASM_IMAGE}\n    imagePullPolicy: Never\n    args: [sleep, '3600']\n"
        );
    }
    let manifest = work.join(format!("{name}.yaml"));
    std::fs::write(&manifest, yaml)?;
    let vm = |args: &[&str]| {
        Command::new(vmrun)
            .arg("--root")
            .arg(root)
            .arg("--state")
            .arg(state)
            .args(args)
            .output()
    };
    let out = vm(&["run", "-d", "--runtime", "wasm", manifest.to_str().unwrap()])?;
    if !out.status.success() {
        bail!("run -d: {}", String::from_utf8_lossy(&out.stderr));
    }
    let record_path = state.join("pods").join(&name).join("pod.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    let record = loop {
        let record: Option<serde_json::Value> = std::fs::read(&record_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(r) = record.filter(|r| {
            r["containers"]
                .as_object()
                .is_some_and(|c| c.values().all(|c| c["phase"] == "running"))
        }) {
            break r;
        }
        if Instant::now() > deadline {
            bail!("pod {name} did not start all its containers");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Let the containers settle into their sleep before measuring.
    std::thread::sleep(Duration::from_secs(1));
    let engine = record["containers"]["c0"]["pid"]
        .as_i64()
        .context("engine pid")? as i32;
    let supervisor = record["supervisor_pid"]
        .as_i64()
        .context("supervisor pid")? as i32;
    let result = (pss(engine)?, pss(supervisor)?);
    let _ = vm(&["stop", &name])?;
    let _ = vm(&["rm", &name])?;
    Ok(result)
}

/// PSS of `pid`: (all, anonymous only), from smaps_rollup.
fn pss(pid: i32) -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("smaps_rollup of {pid}"))?;
    let kib = |key: &str| -> anyhow::Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|k| k * 1024)
            .with_context(|| format!("no {key} line for {pid}"))
    };
    Ok((kib("Pss:")?, kib("Pss_Anon:")?))
}
