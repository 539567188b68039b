//! The wasm runtime: a pod's WebAssembly containers run in wasmtime, all of
//! them in one engine process per pod (`vmrun-wasm`, crate `vmrun-wasm`),
//! one `Store` each, inside the pod's network namespace and cgroup. The
//! pod's namespaces, volumes and cgroup are the native runtime's, so native
//! containers of the same pod (annotation `vmrun.io/native-containers`)
//! share its localhost and volumes.
//!
//! This side is the controller's: it picks the module out of the image,
//! lays out what the guest sees (the image read-only at `/`, one preopened
//! directory per volumeMount) and relays start, signal and exit.

mod engine_process;
pub mod image;
pub mod protocol;
mod sandbox;

use std::path::PathBuf;
use std::sync::Arc;

use crate::native::NativeRuntime;
use crate::plan::{Handler, PodPlan};
use crate::runtime::{Runtime, RuntimeError, Sandbox};

/// Pod annotation: comma-separated names of containers that run natively
/// beside the wasm ones (sidecars from ordinary images).
pub const NATIVE_CONTAINERS_ANNOTATION: &str = "vmrun.io/native-containers";

/// Why nothing can be run inside a wasm container.
pub const NO_EXEC: &str = "a WebAssembly container has no processes to run a command in, so exec (probes, lifecycle hooks, vmrun exec) is not available on the wasm runtime; use tcpSocket or httpGet probes";

/// The engine binary, installed beside `vmrun`.
pub const ENGINE_BINARY: &str = "vmrun-wasm";

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WasmRuntime {
    pub state_root: PathBuf,
    /// The `vmrun-wasm` engine binary.
    pub engine_binary: PathBuf,
    /// Compiled modules, by engine and content digest.
    pub cache_dir: PathBuf,
    pub pids_limit: Option<i64>,
}

impl WasmRuntime {
    /// The runtime of a process installed with the others: the engine
    /// binary beside the running executable (`vmrun`, `vmrun-cri-shim`),
    /// compiled modules cached with the images, in `image_root/wasm-cache`.
    pub fn beside_current_exe(
        state_root: PathBuf,
        image_root: &std::path::Path,
        pids_limit: Option<i64>,
    ) -> std::io::Result<WasmRuntime> {
        Ok(WasmRuntime {
            state_root,
            engine_binary: std::env::current_exe()?.with_file_name(ENGINE_BINARY),
            cache_dir: image_root.join("wasm-cache"),
            pids_limit,
        })
    }

    fn native(&self) -> NativeRuntime {
        NativeRuntime {
            state_root: self.state_root.clone(),
            pids_limit: self.pids_limit,
            // Nothing in a wasm container reads /proc.
            proc_view: None,
        }
    }
}

impl Runtime for WasmRuntime {
    fn name(&self) -> &'static str {
        "wasm"
    }

    fn create_sandbox(&self, pod: &PodPlan) -> Result<Arc<dyn Sandbox>, RuntimeError> {
        check_pod(pod).map_err(RuntimeError::Sandbox)?;
        let native = self.native().create_native_sandbox(pod)?;
        Ok(Arc::new(sandbox::WasmSandbox::new(native, self.clone())))
    }
}

/// Whether `container` runs natively in a wasm pod.
pub fn is_native_container(pod: &PodPlan, container: &str) -> bool {
    pod.annotations
        .get(NATIVE_CONTAINERS_ANNOTATION)
        .is_some_and(|list| list.split(',').any(|n| n.trim() == container))
}

/// What a wasm pod cannot have, refused before anything is made: exec
/// probes and hooks on wasm containers, and native-container names that
/// are not in the pod.
pub fn check_pod(pod: &PodPlan) -> Result<(), String> {
    if let Some(list) = pod.annotations.get(NATIVE_CONTAINERS_ANNOTATION) {
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !pod.all_containers().any(|c| c.name == name) {
                return Err(format!(
                    "annotation {NATIVE_CONTAINERS_ANNOTATION}: the pod has no container {name:?}"
                ));
            }
        }
    }
    for c in pod
        .all_containers()
        .filter(|c| !is_native_container(pod, &c.name))
    {
        let handlers = [
            ("livenessProbe", c.liveness.as_ref().map(|p| &p.handler)),
            ("readinessProbe", c.readiness.as_ref().map(|p| &p.handler)),
            ("startupProbe", c.startup.as_ref().map(|p| &p.handler)),
            ("lifecycle.postStart", c.post_start.as_ref()),
            ("lifecycle.preStop", c.pre_stop.as_ref()),
        ];
        for (field, handler) in handlers {
            if let Some(Handler::Exec(_)) = handler {
                return Err(format!("container {:?}: {field} exec: {NO_EXEC}", c.name));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(yaml: &str) -> PodPlan {
        let manifest = crate::manifest::parse("pod.yaml", yaml).unwrap();
        crate::plan::plan(&manifest, "uid", "node").unwrap()
    }

    #[test]
    fn exec_probes_on_wasm_containers_are_refused_by_name() {
        let pod = plan(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n  - name: app\n    image: x\n    livenessProbe:\n      exec:\n        command: [\"true\"]\n",
        );
        let err = check_pod(&pod).unwrap_err();
        assert!(
            err.contains("\"app\"") && err.contains("livenessProbe exec"),
            "{err}"
        );
    }

    #[test]
    fn native_containers_may_exec_and_must_exist() {
        let ok = plan(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    vmrun.io/native-containers: side\nspec:\n  containers:\n  - name: app\n    image: x\n  - name: side\n    image: y\n    readinessProbe:\n      exec:\n        command: [\"true\"]\n",
        );
        check_pod(&ok).unwrap();
        assert!(is_native_container(&ok, "side") && !is_native_container(&ok, "app"));
        let missing = plan(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    vmrun.io/native-containers: nope\nspec:\n  containers:\n  - name: app\n    image: x\n",
        );
        assert!(check_pod(&missing).unwrap_err().contains("\"nope\""));
    }
}
