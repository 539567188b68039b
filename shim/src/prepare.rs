//! From a manifest to what a pod runs on: the validated plan, its images
//! resolved in the store (for vm also their block images) and the runtime.
//!
//! `vmrun run -d` writes the result into the pod's directory for its
//! supervisor, so the supervisor runs exactly what was checked, without
//! parsing the manifest or opening the image store a second time (and
//! without the code that does so in its memory for the pod's lifetime).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use vmrun_image::{ImageStore, PullPolicy as ImagePullPolicy, PullProgress};
use vmrun_pod::controller::ResolvedImage;
use vmrun_pod::native::NativeRuntime;
use vmrun_pod::plan::{PodPlan, PullPolicy};
use vmrun_pod::runtime::Runtime;
use vmrun_pod::spec::ImageDefaults;
use vmrun_pod::vm::VmRuntime;

use crate::config::Config;

/// The prepared pod's file name in the pod's directory.
pub const PREPARED: &str = "prepared.json";

/// A pod ready to run, as plain data.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct PreparedPod {
    pub plan: PodPlan,
    pub images: HashMap<String, ResolvedImage>,
    /// `native` or `vm`.
    pub runtime: String,
    /// vm: each image's read-only block image, by image reference.
    pub image_disks: BTreeMap<String, PathBuf>,
}

/// A prepared pod with its runtime, as the controller takes it.
pub struct Prepared {
    pub plan: Arc<PodPlan>,
    pub images: Arc<HashMap<String, ResolvedImage>>,
    pub runtime: Arc<dyn Runtime>,
}

impl PreparedPod {
    pub fn with_runtime(self, config: &Config) -> anyhow::Result<Prepared> {
        let runtime: Arc<dyn Runtime> = match self.runtime.as_str() {
            "native" => Arc::new(NativeRuntime {
                state_root: config.state.clone(),
                pids_limit: config.pids_limit,
            }),
            "vm" => Arc::new(VmRuntime {
                state_root: config.state.clone(),
                assets: config.vm_assets(),
                image_disks: self.image_disks,
                pids_limit: config.pids_limit,
                max_vcpus: config.vm.max_vcpus,
                boot_timeout: VmRuntime::boot_timeout_from_env(),
            }),
            other => bail!("runtime {other:?} is not available yet"),
        };
        Ok(Prepared {
            plan: Arc::new(self.plan),
            images: Arc::new(self.images),
            runtime,
        })
    }

    /// Writes the pod to `path`, readable by root only: secret volumes'
    /// contents are part of the plan.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_vec(self)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.write_all(&text)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Reads a pod written by `write` and removes the file, so no copy of
    /// its secrets outlives the read.
    pub fn take(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        serde_json::from_slice(&text)
            .with_context(|| format!("{}: not a prepared pod of this vmrun", path.display()))
    }
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

/// Loads and validates the manifest, then pulls (if `pull`, by each
/// container's policy; else only what the store has) and resolves its images.
pub async fn prepare(
    config: &Config,
    manifest: &Path,
    runtime_flag: Option<&str>,
    uid: &str,
    pull: bool,
) -> anyhow::Result<PreparedPod> {
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
    let mut image_disks = BTreeMap::new();
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
    Ok(PreparedPod {
        plan,
        images,
        runtime: runtime_name.to_string(),
        image_disks,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const MANIFEST: &str = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringData:\n  \
        token: hunter2\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  \
        containers:\n  - name: c\n    image: busybox\n    command: [sh, -c, 'cat /s/token']\n    \
        volumeMounts:\n    - {name: s, mountPath: /s}\n  volumes:\n  - name: s\n    \
        secret: {secretName: s}\n";

    fn prepared_pod() -> PreparedPod {
        let manifest = vmrun_pod::manifest::parse("pod.yaml", MANIFEST).unwrap();
        let plan = vmrun_pod::plan::plan(&manifest, "uid-1", "node").unwrap();
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
            runtime: "vm".into(),
            image_disks: BTreeMap::from([("busybox".into(), "/store/block/a.erofs".into())]),
        }
    }

    #[test]
    fn the_supervisor_gets_the_pod_as_prepared_and_the_file_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PREPARED);
        let pod = prepared_pod();
        pod.write(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the file holds secret data");
        let back = PreparedPod::take(&path).unwrap();
        assert!(!path.exists(), "take removes the file");
        assert_eq!(format!("{back:?}"), format!("{pod:?}"));
        let secret = back.plan.volumes.iter().find(|v| v.name == "s").unwrap();
        let vmrun_pod::plan::VolumeSource::Files(files) = &secret.source else {
            panic!("secret volume became {:?}", secret.source);
        };
        assert_eq!(files[0].data, b"hunter2");
    }

    #[test]
    fn an_existing_file_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PREPARED);
        std::fs::write(&path, "other").unwrap();
        let err = prepared_pod().write(&path).unwrap_err();
        assert!(format!("{err:#}").contains(PREPARED), "{err:#}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "other");
    }

    #[test]
    fn a_foreign_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PREPARED);
        std::fs::write(&path, "{\"plan\": 1}").unwrap();
        let err = PreparedPod::take(&path).unwrap_err();
        assert!(format!("{err:#}").contains("not a prepared pod"), "{err:#}");
    }

    #[test]
    fn the_runtime_comes_from_the_flag_then_the_runtime_class() {
        assert_eq!(select_runtime(None, None).unwrap(), "native");
        assert_eq!(select_runtime(None, Some("vm")).unwrap(), "vm");
        assert_eq!(select_runtime(Some("runc"), Some("vm")).unwrap(), "native");
        let err = select_runtime(None, Some("kata")).unwrap_err();
        assert!(err.to_string().contains("spec.runtimeClassName"), "{err}");
    }
}
