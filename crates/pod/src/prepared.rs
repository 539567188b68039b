//! A pod ready to run, as plain data: its validated plan, its images as
//! resolved in the store and the runtime with its settings.
//!
//! `vmrun run -d` writes it into the pod's directory for the detached
//! supervisor (`vmrun-supervisor`), which thereby runs exactly what was
//! checked without parsing the manifest, reading the configuration or
//! opening the image store again, and without that code in its memory for
//! the pod's lifetime.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::controller::ResolvedImage;
use crate::native::NativeRuntime;
use crate::plan::PodPlan;
use crate::runtime::Runtime;
use crate::vm::VmRuntime;
use crate::wasm::WasmRuntime;

/// The prepared pod's file name in the pod's directory.
pub const PREPARED_FILE: &str = "prepared.json";

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct PreparedPod {
    pub plan: PodPlan,
    /// Every image the pod's containers name, by reference.
    pub images: HashMap<String, ResolvedImage>,
    pub runtime: PodRuntime,
    /// The node's CNI network the pod joins; None: loopback only.
    #[serde(default)]
    pub network: Option<vmrun_cni::NetworkSettings>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum PodRuntime {
    Native(NativeRuntime),
    Vm(VmRuntime),
    Wasm(WasmRuntime),
}

/// A prepared pod in the shape the controller takes it.
pub struct RunnablePod {
    pub plan: Arc<PodPlan>,
    pub images: Arc<HashMap<String, ResolvedImage>>,
    pub runtime: Arc<dyn Runtime>,
    pub network: Option<vmrun_cni::NetworkSettings>,
}

#[derive(Debug, thiserror::Error)]
pub enum PreparedError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a prepared pod of this vmrun version: {source}")]
    Format {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl PreparedPod {
    pub fn runtime_name(&self) -> &'static str {
        match &self.runtime {
            PodRuntime::Native(r) => r.name(),
            PodRuntime::Vm(r) => r.name(),
            PodRuntime::Wasm(r) => r.name(),
        }
    }

    pub fn into_runnable(self) -> RunnablePod {
        let runtime: Arc<dyn Runtime> = match self.runtime {
            PodRuntime::Native(r) => Arc::new(r),
            PodRuntime::Vm(r) => Arc::new(r),
            PodRuntime::Wasm(r) => Arc::new(r),
        };
        RunnablePod {
            plan: Arc::new(self.plan),
            images: Arc::new(self.images),
            runtime,
            network: self.network,
        }
    }

    /// Writes the pod to a new file at `path`, readable by root only:
    /// secret volumes' contents are part of the plan.
    pub fn write(&self, path: &Path) -> Result<(), PreparedError> {
        let io = |source| PreparedError::Io {
            path: path.to_path_buf(),
            source,
        };
        let text = serde_json::to_vec(self).map_err(|source| PreparedError::Format {
            path: path.to_path_buf(),
            source,
        })?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        file.write_all(&text).map_err(io)
    }

    /// Reads a pod `write` wrote and removes the file, so no copy of its
    /// secrets outlives the read.
    pub fn take(path: &Path) -> Result<Self, PreparedError> {
        let io = |source| PreparedError::Io {
            path: path.to_path_buf(),
            source,
        };
        let text = std::fs::read(path).map_err(io)?;
        std::fs::remove_file(path).map_err(io)?;
        serde_json::from_slice(&text).map_err(|source| PreparedError::Format {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use super::*;
    use crate::plan::VolumeSource;
    use crate::spec::ImageDefaults;
    use crate::vm::VmAssets;

    const MANIFEST: &str = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringData:\n  \
        token: hunter2\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  \
        containers:\n  - name: c\n    image: busybox\n    command: [sh, -c, 'cat /s/token']\n    \
        volumeMounts:\n    - {name: s, mountPath: /s}\n  volumes:\n  - name: s\n    \
        secret: {secretName: s}\n";

    fn prepared_pod() -> PreparedPod {
        let manifest = crate::manifest::parse("pod.yaml", MANIFEST).unwrap();
        let plan = crate::plan::plan(&manifest, "uid-1", "node").unwrap();
        PreparedPod {
            plan,
            images: HashMap::from([(
                "busybox".to_string(),
                ResolvedImage {
                    defaults: ImageDefaults {
                        entrypoint: vec![],
                        cmd: vec!["sh".into()],
                        env: vec!["PATH=/bin".into()],
                        working_dir: None,
                        user: Some("1000".into()),
                    },
                    layers: vec!["/store/layers/a".into()],
                },
            )]),
            runtime: PodRuntime::Vm(VmRuntime {
                state_root: "/run/vmrun".into(),
                assets: VmAssets {
                    vmm: "/usr/bin/vmrun-vmm".into(),
                    kernel: "/guest/vmlinux".into(),
                    initramfs: "/guest/initramfs.cpio".into(),
                },
                image_disks: BTreeMap::from([("busybox".into(), "/store/a.erofs".into())]),
                pids_limit: Some(1024),
                max_vcpus: Some(1),
                boot_timeout: Duration::from_secs(60),
                spare_disks: 0,
                pod_network: true,
                jail: Default::default(),
            }),
            network: Some(vmrun_cni::NetworkSettings {
                conf_dir: "/etc/cni/net.d".into(),
                bin_dirs: vec!["/usr/lib/cni".into()],
                cache_dir: "/run/vmrun/cni-cache".into(),
            }),
        }
    }

    #[test]
    fn the_supervisor_gets_the_pod_as_prepared_and_the_file_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PREPARED_FILE);
        let pod = prepared_pod();
        pod.write(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the file holds secret data");
        let back = PreparedPod::take(&path).unwrap();
        assert!(!path.exists(), "take removes the file");
        assert_eq!(format!("{back:?}"), format!("{pod:?}"));
        assert_eq!(back.runtime_name(), "vm");
        let secret = back.plan.volumes.iter().find(|v| v.name == "s").unwrap();
        let VolumeSource::Files(files) = &secret.source else {
            panic!("the secret volume became {:?}", secret.source);
        };
        assert_eq!(files[0].data, b"hunter2");
        let runnable = back.into_runnable();
        assert_eq!(runnable.runtime.name(), "vm");
        assert_eq!(runnable.plan.uid, "uid-1");
    }

    #[test]
    fn an_existing_file_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PREPARED_FILE);
        std::fs::write(&path, "other").unwrap();
        let err = prepared_pod().write(&path).unwrap_err();
        assert!(err.to_string().contains(PREPARED_FILE), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "other");
    }

    #[test]
    fn a_foreign_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PREPARED_FILE);
        std::fs::write(&path, "{\"plan\": 1}").unwrap();
        let err = PreparedPod::take(&path).unwrap_err();
        assert!(err.to_string().contains("not a prepared pod"), "{err}");
    }
}
