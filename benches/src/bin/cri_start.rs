//! CRI pod start latency and the memory of an idle `vmrun serve` (issue 11).
//!
//! Start latency: RunPodSandbox + CreateContainer + StartContainer, as the
//! kubelet calls them, from the first request to StartContainer's reply;
//! one busybox container (`echo ready`, then idle), image already pulled.
//! Pods are kept until the run ends (as on a node), then stopped and removed.
//!
//! Memory: the PSS (`/proc/<pid>/smaps_rollup`) of the idle `vmrun serve`
//! process with 0 pods and with 20 native pods, and the mean PSS of a pod's
//! owner (`vmrun-cri-shim`) and of its pause process.
//!
//! `cargo run --release -p vmrun-benches --bin cri_start -- [RUNS]
//!  [--containerd SOCKET REGISTRY]` (as root). With `--containerd`, the same
//! sequence runs against that CRI endpoint too (e.g. containerd 1.6 with
//! runc), interleaved pod by pod, on the same image: the benchmark pushes
//! its busybox image to REGISTRY (`HOST:PORT`, plain HTTP, e.g. a
//! `docker-registry` on 127.0.0.1:5000) as `REGISTRY/bench/busybox:latest`,
//! and a pause image (the same layer, `sleep infinity`) as
//! `REGISTRY/bench/pause:latest`, which the endpoint's configuration must
//! name as its sandbox image; both endpoints pull them before the first pod,
//! as a node has them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tonic::transport::Channel;
use vmrun_benches::{ms, summarize};
use vmrun_cri_api::v1 as api;
use vmrun_cri_api::v1::runtime_service_client::RuntimeServiceClient;
use vmrun_tests::cri::{kubelet_container_config, kubelet_sandbox_config, CriServer};

const MEMORY_PODS: usize = 20;
const COMMAND: &str = "trap 'exit 0' TERM; echo ready; sleep 3600 & wait";

struct Endpoint {
    name: String,
    client: RuntimeServiceClient<Channel>,
    image: String,
    pods: Vec<String>,
    samples: Vec<Duration>,
}

impl Endpoint {
    async fn start_pod(&mut self, i: usize, logs: &Path) -> anyhow::Result<()> {
        let name = format!("bench-{i}");
        let config = kubelet_sandbox_config(&name, &format!("uid-{}-{i}", self.name), logs);
        let container =
            kubelet_container_config("c", &self.image, &["/bin/sh", "-c", COMMAND], &config);
        let t0 = Instant::now();
        let sandbox = self
            .client
            .run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .with_context(|| format!("{}: RunPodSandbox", self.name))?
            .into_inner()
            .pod_sandbox_id;
        self.pods.push(sandbox.clone());
        let id = self
            .client
            .create_container(api::CreateContainerRequest {
                pod_sandbox_id: sandbox,
                config: Some(container),
                sandbox_config: Some(config),
            })
            .await
            .with_context(|| format!("{}: CreateContainer", self.name))?
            .into_inner()
            .container_id;
        self.client
            .start_container(api::StartContainerRequest { container_id: id })
            .await
            .with_context(|| format!("{}: StartContainer", self.name))?;
        self.samples.push(t0.elapsed());
        Ok(())
    }

    async fn remove_all(&mut self) -> anyhow::Result<()> {
        for id in std::mem::take(&mut self.pods) {
            self.client
                .stop_pod_sandbox(api::StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await
                .with_context(|| format!("{}: StopPodSandbox", self.name))?;
            self.client
                .remove_pod_sandbox(api::RemovePodSandboxRequest { pod_sandbox_id: id })
                .await
                .with_context(|| format!("{}: RemovePodSandbox", self.name))?;
        }
        Ok(())
    }
}

/// The CNI network of vmrun's pods when compared with containerd.
fn bench_network(ipam: &Path) -> String {
    format!(
        r#"{{"cniVersion": "1.0.0", "name": "vmrun-bench", "plugins": [
  {{"type": "bridge", "bridge": "vmrunbench0", "isGateway": true, "ipMasq": false,
    "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "10.198.0.0/16"}}]], "dataDir": {ipam:?}}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}}]}}"#
    )
}

/// The benchmark's busybox image and a pause image of the same layer, in
/// `registry`: their references.
async fn push_bench_images(registry: &str) -> anyhow::Result<(String, String)> {
    use vmrun_tests::images::{
        busybox_entries, layer_tar, push_image, Compression, ImageSpec, Layer,
    };
    let busybox = vmrun_tests::images::busybox_image(Compression::Gzip)?;
    let busybox = push_image(registry, "bench/busybox:latest", &busybox).await?;
    let layer = Layer::new(layer_tar(&busybox_entries()?)?, Compression::Gzip)?;
    let mut spec = ImageSpec::new(vec![layer]);
    spec.entrypoint = Some(vec!["/bin/sleep".into(), "infinity".into()]);
    spec.cmd = vec![];
    let pause = push_image(registry, "bench/pause:latest", &spec.build()).await?;
    Ok((busybox, pause))
}

fn pss_kib(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("smaps_rollup of {pid}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no Pss line")
}

/// The PSS once it has stopped moving (within 64 KiB over 2 s).
fn settled_pss_kib(pid: u32) -> anyhow::Result<u64> {
    let mut last = pss_kib(pid)?;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_secs(2));
        let now = pss_kib(pid)?;
        if now.abs_diff(last) <= 64 {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

fn processes_named(name: &str, marker: &str) -> Vec<u32> {
    vmrun_tests::pod::process_table()
        .into_iter()
        .filter(|(_, _, cmd)| cmd.contains(name) && cmd.contains(marker))
        .map(|(pid, _, _)| pid as u32)
        .collect()
}

fn mean_pss(pids: &[u32]) -> f64 {
    let total: u64 = pids.iter().filter_map(|p| pss_kib(*p).ok()).sum();
    total as f64 / pids.len().max(1) as f64 / 1024.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    vmrun_tests::pod::require_root("cri_start");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs: usize = args
        .first()
        .filter(|a| !a.starts_with("--"))
        .map(|a| a.parse())
        .transpose()
        .context("RUNS")?
        .unwrap_or(50);
    let containerd = match args.iter().position(|a| a == "--containerd") {
        Some(i) => match (args.get(i + 1), args.get(i + 2)) {
            (Some(socket), Some(registry)) => Some((PathBuf::from(socket), registry.clone())),
            _ => bail!("--containerd SOCKET REGISTRY"),
        },
        None => None,
    };
    if runs < MEMORY_PODS {
        bail!("RUNS must be at least {MEMORY_PODS} (the memory measurement's pods)");
    }

    // Against containerd both runtimes give pods the same kind of network
    // (CNI bridge + host-local + portmap, each on its own bridge), as
    // containerd cannot run a pod without one; alone, vmrun pods get
    // loopback only.
    let ipam = tempfile::tempdir()?;
    let server = match &containerd {
        Some(_) => CriServer::start_release_with_network(&bench_network(ipam.path())).await,
        None => CriServer::start_release().await,
    };
    let daemon = server.pid().context("vmrun serve's pid")?;
    let (busybox, pause) = match &containerd {
        Some((_, registry)) => {
            let (busybox, pause) = push_bench_images(registry).await?;
            (busybox, Some(pause))
        }
        None => (vmrun_tests::shared_busybox().await?, None),
    };
    let image = server.pull(&busybox).await;
    let idle_0 = settled_pss_kib(daemon)?;

    let logs = tempfile::tempdir()?;
    let mut endpoints = vec![Endpoint {
        name: "vmrun native".into(),
        client: server.runtime().await,
        image,
        pods: Vec::new(),
        samples: Vec::new(),
    }];
    if let Some((socket, _)) = &containerd {
        let channel = vmrun_cri::unix::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        let mut images = api::image_service_client::ImageServiceClient::new(channel.clone());
        for image in [&busybox].into_iter().chain(pause.as_ref()) {
            images
                .pull_image(api::PullImageRequest {
                    image: Some(api::ImageSpec {
                        image: image.clone(),
                        ..Default::default()
                    }),
                    auth: None,
                    sandbox_config: None,
                })
                .await
                .with_context(|| format!("pulling {image} into {}", socket.display()))?;
        }
        endpoints.push(Endpoint {
            name: "containerd".into(),
            client: RuntimeServiceClient::new(channel),
            image: busybox.clone(),
            pods: Vec::new(),
            samples: Vec::new(),
        });
    }
    let mut idle_20 = None;
    let mut owner_mib = 0.0;
    let mut pause_mib = 0.0;
    for i in 0..runs {
        for e in endpoints.iter_mut() {
            e.start_pod(i, logs.path()).await?;
        }
        if i + 1 == MEMORY_PODS {
            idle_20 = Some(settled_pss_kib(daemon)?);
            let state = server.vmrun.state.path().to_string_lossy().into_owned();
            owner_mib = mean_pss(&processes_named("vmrun-cri-shim", &state));
            let pause: Vec<u32> = vmrun_tests::pod::process_table()
                .into_iter()
                .filter(|(_, ppid, _)| {
                    processes_named("vmrun-cri-shim", &state).contains(&(*ppid as u32))
                })
                .map(|(pid, _, _)| pid as u32)
                .collect();
            pause_mib = mean_pss(&pause);
        }
    }
    println!("CRI RunPodSandbox+CreateContainer+StartContainer, {runs} pods each, kept running:");
    println!("| runtime | p50 ms | p99 ms | mean ms |");
    println!("|---|---|---|---|");
    let mut p50s = Vec::new();
    for e in &endpoints {
        let s = summarize(&e.samples);
        p50s.push((s.p50, s.p99));
        println!(
            "| {} | {:.1} | {:.1} | {:.1} |",
            e.name,
            ms(s.p50),
            ms(s.p99),
            ms(s.mean)
        );
    }
    if let [(v50, v99), (c50, c99)] = p50s[..] {
        println!(
            "vmrun/containerd: p50 {:.2}x, p99 {:.2}x",
            v50.as_secs_f64() / c50.as_secs_f64(),
            v99.as_secs_f64() / c99.as_secs_f64()
        );
    } else {
        println!("(no --containerd endpoint given: vmrun alone)");
    }
    println!(
        "idle vmrun serve PSS: {:.1} MiB with 0 pods, {:.1} MiB with {MEMORY_PODS} native pods",
        idle_0 as f64 / 1024.0,
        idle_20.unwrap_or(0) as f64 / 1024.0
    );
    println!(
        "per pod, outside the daemon: owner (vmrun-cri-shim) {owner_mib:.2} MiB PSS, its other children (pause, containers) {pause_mib:.2} MiB mean"
    );
    for e in endpoints.iter_mut() {
        e.remove_all().await?;
    }
    let left: Vec<_> = processes_named(
        "vmrun-cri-shim",
        &server.vmrun.state.path().to_string_lossy(),
    );
    if !left.is_empty() {
        bail!("owners left after removing every pod: {left:?}");
    }
    Ok(())
}
