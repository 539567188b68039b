//! A wasm pod: the native sandbox's namespaces, volumes and cgroup, with
//! one engine process in them that runs every wasm container of the pod
//! (one wasmtime `Store` each). Containers listed in the
//! `vmrun.io/native-containers` annotation run natively beside them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::Signal;
use oci_spec::runtime::LinuxResources;
use serde_json::json;

use super::engine_process::{log_tail, EngineError, EngineLaunch, EngineProcess};
use super::image::find_entry;
use super::protocol::{Preopen, StartRequest};
use super::{is_native_container, WasmRuntime};
use crate::command::resolve_argv;
use crate::native::{remove_tree, NativeSandbox};
use crate::plan::ContainerPlan;
use crate::runtime::{
    CgroupStats, ExecOutput, ExitInfo, Launch, PodStream, Running, RuntimeError, Sandbox,
};
use crate::spec::merged_env;

/// How long the engine may take to compile and instantiate a module.
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a killed container may take to report its end.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// What the engine itself may use beyond its containers' memory limits.
const ENGINE_OVERHEAD: u64 = 64 << 20;

pub(crate) struct WasmSandbox {
    native: NativeSandbox,
    runtime: WasmRuntime,
    engine: Mutex<Option<Arc<EngineProcess>>>,
    next_id: AtomicU64,
}

impl WasmSandbox {
    pub(crate) fn new(native: NativeSandbox, runtime: WasmRuntime) -> WasmSandbox {
        WasmSandbox {
            native,
            runtime,
            engine: Mutex::new(None),
            next_id: AtomicU64::new(1),
        }
    }

    fn wasm_containers(&self) -> impl Iterator<Item = &ContainerPlan> {
        let pod = self.native.pod();
        pod.all_containers()
            .filter(move |c| !is_native_container(pod, &c.name))
    }

    /// The engine, started on first use.
    fn engine(&self) -> Result<Arc<EngineProcess>, RuntimeError> {
        let mut slot = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(engine) = slot.as_ref() {
            if let Some(why) = engine.gone() {
                return Err(RuntimeError::Sandbox(format!(
                    "the pod's wasm engine {why}"
                )));
            }
            return Ok(engine.clone());
        }
        let count = self.wasm_containers().count() as u32;
        let limits: Vec<Option<u64>> = self
            .wasm_containers()
            .map(|c| c.resources.memory_limit)
            .collect();
        let cpus: Vec<Option<u64>> = self
            .wasm_containers()
            .map(|c| c.resources.cpu_limit_milli)
            .collect();
        // The engine's cgroup holds every wasm container: it gets their sum
        // when each has a limit (per container, the engine enforces its own).
        let mut resources = serde_json::Map::new();
        if limits.iter().all(Option::is_some) && !limits.is_empty() {
            let sum: u64 = limits.iter().flatten().sum();
            resources.insert("memory".into(), json!({ "limit": sum + ENGINE_OVERHEAD }));
        }
        if cpus.iter().all(Option::is_some) && !cpus.is_empty() {
            let milli: u64 = cpus.iter().flatten().sum();
            resources.insert(
                "cpu".into(),
                json!({ "quota": (milli * 100).max(1000), "period": 100_000 }),
            );
        }
        if let Some(pids) = self.runtime.pids_limit {
            resources.insert("pids".into(), json!({ "limit": pids }));
        }
        let resources: oci_spec::runtime::LinuxResources =
            serde_json::from_value(serde_json::Value::Object(resources))
                .map_err(|e| RuntimeError::Sandbox(format!("engine cgroup: {e}")))?;
        let cgroup_path = format!("{}/wasm", self.native.cgroup());
        let cgroup = vmrun_container::cgroups::open(&cgroup_path, Some(&resources))
            .map_err(|e| RuntimeError::Sandbox(format!("engine cgroup: {e}")))?;
        let launch = EngineLaunch {
            binary: self.runtime.engine_binary.clone(),
            cache_dir: self.runtime.cache_dir.clone(),
            // Restarts reuse a freed slot; two per container leaves room for
            // one container restarting while its old store is dropped.
            // A CRI sandbox's containers come later: room for a typical pod.
            instances: if count == 0 { 16 } else { 2 * count + 2 },
            max_memory: limits.iter().flatten().copied().max().unwrap_or(4 << 30),
            netns: self.native.netns_path(),
            cgroup,
            log: self.native.dir().join("wasm-engine.log"),
            pod_dir: self.native.dir().to_path_buf(),
        };
        let engine =
            EngineProcess::spawn(launch).map_err(|e| RuntimeError::Sandbox(e.to_string()))?;
        *slot = Some(engine.clone());
        Ok(engine)
    }

    /// The image's files as one read-only tree: the layer itself when there
    /// is one, else a read-only overlay of them (unmounted on remove).
    fn image_root(&self, dir: &Path, layers: &[PathBuf]) -> Result<(PathBuf, bool), String> {
        match layers {
            [] => {
                let empty = dir.join("empty");
                std::fs::create_dir_all(&empty).map_err(|e| format!("{}: {e}", empty.display()))?;
                Ok((empty, false))
            }
            [one] => Ok((one.clone(), false)),
            many => {
                let root = dir.join("rootfs");
                std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
                let lower: Vec<String> =
                    many.iter().rev().map(|l| l.display().to_string()).collect();
                let data = format!("lowerdir={}", lower.join(":"));
                mount(
                    Some("overlay"),
                    &root,
                    Some("overlay"),
                    MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
                    Some(data.as_str()),
                )
                .map_err(|e| format!("mounting the image's layers on {}: {e}", root.display()))?;
                Ok((root, true))
            }
        }
    }

    fn preopens(&self, c: &ContainerPlan, image_root: PathBuf) -> Result<Vec<Preopen>, String> {
        let mut preopens = vec![Preopen {
            host: image_root,
            guest: "/".into(),
            read_only: true,
        }];
        for m in &c.mounts {
            let host = match (&m.host_path, self.native.volume_dir(&m.volume)) {
                (Some(host), _) => host.clone(),
                (None, Some(dir)) => match &m.sub_path {
                    Some(sub) => {
                        let path = dir.join(sub);
                        // Kubernetes creates a missing subPath as a directory.
                        std::fs::create_dir_all(&path)
                            .map_err(|e| format!("subPath {}: {e}", path.display()))?;
                        path
                    }
                    None => dir.to_path_buf(),
                },
                (None, None) => return Err(format!("volume {:?} is not in the pod", m.volume)),
            };
            if !host.is_dir() {
                // WASI preopens directories only.
                return Err(format!(
                    "volumeMount {}: {} is not a directory (a wasm container can only mount directories)",
                    m.path,
                    host.display()
                ));
            }
            preopens.push(Preopen {
                host,
                guest: m.path.clone(),
                read_only: m.read_only,
            });
        }
        Ok(preopens)
    }
}

impl Sandbox for WasmSandbox {
    fn start(&self, launch: Launch) -> Result<Arc<dyn Running>, RuntimeError> {
        let pod = self.native.pod();
        let c = launch.container.clone();
        if is_native_container(pod, &c.name) {
            return self.native.start(launch);
        }
        launch.refuse_stdin_and_tty("wasm")?;
        let start_err = |message: String| RuntimeError::Start {
            container: c.name.clone(),
            message,
        };
        let argv = resolve_argv(
            c.command.as_deref(),
            c.args.as_deref(),
            &launch.image.entrypoint,
            &launch.image.cmd,
            &c.env,
        );
        let entry = find_entry(
            &c.image,
            &launch.layers,
            argv.first().map(String::as_str).unwrap_or(""),
        )
        .map_err(|e| start_err(e.to_string()))?;
        let dir = self
            .native
            .dir()
            .join("containers")
            .join(format!("{}-{}", c.name, launch.attempt));
        remove_tree(&dir).map_err(|e| start_err(format!("{}: {e}", dir.display())))?;
        std::fs::create_dir_all(&dir).map_err(|e| start_err(format!("{}: {e}", dir.display())))?;
        let cleanup = |mounted: bool| {
            if mounted {
                let _ = umount2(&dir.join("rootfs"), MntFlags::MNT_DETACH);
            }
            let _ = remove_tree(&dir);
        };
        let (root, mounted) = self.image_root(&dir, &launch.layers).map_err(|e| {
            cleanup(false);
            start_err(e)
        })?;
        let preopens = self.preopens(&c, root).map_err(|e| {
            cleanup(mounted);
            start_err(e)
        })?;
        let cwd = c
            .working_dir
            .clone()
            .or_else(|| launch.image.working_dir.clone().filter(|d| !d.is_empty()));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = StartRequest {
            id,
            name: c.name.clone(),
            wasm: entry.host_path,
            args: argv,
            env: merged_env(pod, &c, &launch.image),
            preopens,
            cwd,
            memory_limit: c.resources.memory_limit,
            cpu_limit_milli: c.resources.cpu_limit_milli,
        };
        let engine = self.engine().inspect_err(|_| cleanup(mounted))?;
        if let Err(e) = engine.start(request, &launch.stdout, &launch.stderr, START_TIMEOUT) {
            cleanup(mounted);
            let mut message = e.to_string();
            if matches!(e, EngineError::Gone(_)) {
                let tail = log_tail(&self.native.dir().join("wasm-engine.log"));
                if !tail.is_empty() {
                    message = format!("{message}; its log ends:\n{tail}");
                }
            }
            return Err(start_err(message));
        }
        Ok(Arc::new(WasmContainer {
            name: c.name.clone(),
            id,
            engine,
            dir,
            mounted,
        }))
    }

    fn exec(
        &self,
        target: &dyn Running,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        if target.exec_target()["runtime"] == "native" {
            return self.native.exec(target, argv, timeout);
        }
        Err(RuntimeError::Exec {
            container: target.name().to_string(),
            message: super::NO_EXEC.to_string(),
        })
    }

    fn connect(&self, port: u16, timeout: Duration) -> Result<Box<dyn PodStream>, RuntimeError> {
        self.native.connect(port, timeout)
    }

    fn destroy(&self) -> Result<(), RuntimeError> {
        let engine = self.engine.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut errors = Vec::new();
        if let Some(engine) = engine {
            engine.kill();
            if let Err(e) = engine.remove_cgroup() {
                errors.push(format!("engine cgroup: {e}"));
            }
        }
        if let Err(e) = self.native.teardown() {
            errors.push(e.to_string());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(RuntimeError::Destroy(errors.join("; ")))
        }
    }

    fn network_holder_pid(&self) -> Option<i32> {
        self.native.network_holder_pid()
    }

    fn lost(&self) -> Option<String> {
        let engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        engine
            .as_ref()
            .and_then(|e| e.gone())
            .map(|why| format!("the pod's wasm engine {why}"))
    }

    fn usage(&self) -> Result<Option<CgroupStats>, RuntimeError> {
        // The pod's cgroup holds the engine and any native containers.
        self.native.usage()
    }
}

struct WasmContainer {
    name: String,
    id: u64,
    engine: Arc<EngineProcess>,
    dir: PathBuf,
    mounted: bool,
}

impl WasmContainer {
    fn control_err(&self, e: impl std::fmt::Display) -> RuntimeError {
        RuntimeError::Control {
            container: self.name.clone(),
            message: e.to_string(),
        }
    }
}

impl Running for WasmContainer {
    fn name(&self) -> &str {
        &self.name
    }
    fn pid(&self) -> i32 {
        self.engine.pid()
    }
    fn signal(&self, signal: Signal) -> Result<(), RuntimeError> {
        self.engine
            .signal(self.id, signal as i32)
            .map_err(|e| self.control_err(e))
    }
    fn wait(&self) -> Result<ExitInfo, RuntimeError> {
        self.engine
            .wait(self.id, None)
            .ok_or_else(|| self.control_err("no exit status"))
    }
    fn remove(&self) -> Result<(), RuntimeError> {
        if self.engine.wait(self.id, Some(Duration::ZERO)).is_none() {
            let _ = self.engine.signal(self.id, libc::SIGKILL);
            if self.engine.wait(self.id, Some(KILL_TIMEOUT)).is_none() {
                // A store that does not end at an epoch tick means the engine
                // is stuck: end it, which ends every container it runs.
                self.engine.kill();
            }
        }
        self.engine.forget(self.id);
        if self.mounted {
            if let Err(e) = umount2(&self.dir.join("rootfs"), MntFlags::MNT_DETACH) {
                return Err(self.control_err(format!("unmounting the image: {e}")));
            }
        }
        remove_tree(&self.dir).map_err(|e| self.control_err(format!("{}: {e}", self.dir.display())))
    }
    fn exec_target(&self) -> serde_json::Value {
        json!({ "runtime": "wasm", "pid": self.pid() })
    }
    fn usage(&self) -> Result<Option<CgroupStats>, RuntimeError> {
        // Every wasm container of the pod runs in its one engine process,
        // whose cgroup is the pod's account (Sandbox::usage).
        Ok(None)
    }
    fn update_resources(&self, _resources: &LinuxResources) -> Result<(), RuntimeError> {
        Err(self.control_err(
            "a wasm container's limits are fixed when its store is made: \
             recreate it to change them",
        ))
    }
}
