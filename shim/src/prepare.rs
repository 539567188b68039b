//! From a manifest to a pod ready to run (`vmrun_pod::prepared`): the
//! validated plan, its images pulled and resolved in the store (for vm also
//! their block images) and the runtime with this installation's settings.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context};
use vmrun_image::{ImageStore, PullPolicy as ImagePullPolicy};
use vmrun_pod::controller::ResolvedImage;
use vmrun_pod::native::NativeRuntime;
use vmrun_pod::plan::PullPolicy;
use vmrun_pod::prepared::{PodRuntime, PreparedPod};
use vmrun_pod::spec::ImageDefaults;
use vmrun_pod::vm::VmRuntime;
use vmrun_pod::wasm::WasmRuntime;

use crate::config::Config;

/// Where pods' state lives unless configured elsewhere; refused to hostPaths whatever the
/// configuration says (the /proc view and other installations' pods live there).
const DEFAULT_STATE: &str = "/run/vmrun";

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
        "wasm" => Ok("wasm"),
        other => bail!("{source}: unknown runtime {other:?} (expected native, vm or wasm)"),
    }
}

/// Loads and validates the manifest, then pulls its images by each
/// container's pull policy (with progress on the terminal) and resolves them.
pub async fn prepare(
    config: &Config,
    manifest: &Path,
    runtime_flag: Option<&str>,
    uid: &str,
) -> anyhow::Result<PreparedPod> {
    let manifest = vmrun_pod::manifest::load(manifest)?;
    let node = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let plan = vmrun_pod::plan::plan(&manifest, uid, &node)?;
    // Pods' records, logs and volumes, and the image store, are vmrun's own.
    vmrun_pod::plan::check_host_paths_outside(
        &plan,
        &[&config.state, &config.root, Path::new(DEFAULT_STATE)],
    )?;
    let runtime_name = select_runtime(runtime_flag, plan.runtime_class.as_deref())?;
    if runtime_name == "wasm" {
        vmrun_pod::wasm::check_pod(&plan)
            .map_err(|e| anyhow::anyhow!("pod {:?}: {e}", plan.name))?;
    }
    let store = ImageStore::open(&config.root, config.registries.clone())?;
    let progress = crate::image_cmd::TerminalProgress::new();
    let mut images = HashMap::new();
    let mut image_disks = BTreeMap::new();
    for c in plan.all_containers() {
        if images.contains_key(&c.image) {
            continue;
        }
        let policy = match c.pull_policy {
            PullPolicy::Never => ImagePullPolicy::Never,
            PullPolicy::Always => ImagePullPolicy::Always,
            PullPolicy::IfNotPresent => ImagePullPolicy::IfNotPresent,
        };
        let image = store
            .ensure(&c.image, policy, &progress)
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
        if runtime_name == "wasm" {
            check_wasm_image(&plan, c, &image.layers, &cfg.entrypoint, &cfg.cmd)?;
        }
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
    // A configured network must load before the pod makes anything;
    // hostNetwork pods stay on the host's.
    let network = match config.network_settings() {
        Some(settings) if !plan.host_network => {
            let list = vmrun_cni::load_default(&settings.conf_dir).with_context(|| {
                format!("[network] cni_conf_dir {}", settings.conf_dir.display())
            })?;
            if let Some(p) = plan.host_ports.first() {
                if !list
                    .plugins
                    .iter()
                    .any(|p| p.has_capability("portMappings"))
                {
                    bail!(
                        "pod {:?}: {}.hostPort {}: network {:?} ({}) has no plugin with the \
                         portMappings capability to publish it; add \
                         {{\"type\": \"portmap\", \"capabilities\": {{\"portMappings\": true}}}}",
                        plan.name,
                        p.field,
                        p.host_port,
                        list.name,
                        settings.conf_dir.display()
                    );
                }
            }
            Some(settings)
        }
        _ => None,
    };
    if let (None, Some(p), false) = (&network, plan.host_ports.first(), plan.host_network) {
        bail!(
            "pod {:?}: {}.hostPort {}: publishing a port needs a pod network, and none is \
             configured (set [network] cni_conf_dir in the config file, with the portmap plugin)",
            plan.name,
            p.field,
            p.host_port
        );
    }
    let runtime = match runtime_name {
        "native" => PodRuntime::Native(NativeRuntime {
            state_root: config.state.clone(),
            pids_limit: config.pids_limit,
            proc_view: config.proc_view_setup(),
        }),
        "vm" => PodRuntime::Vm(VmRuntime {
            state_root: config.state.clone(),
            assets: config.vm_assets(),
            image_disks,
            pids_limit: config.pids_limit,
            max_vcpus: config.vm.max_vcpus,
            boot_timeout: VmRuntime::boot_timeout_from_env(),
            spare_disks: 0,
            pod_network: network.is_some(),
            jail: config.vm_jail(),
        }),
        "wasm" => PodRuntime::Wasm(
            WasmRuntime::beside_current_exe(config.state.clone(), &config.root, config.pids_limit)
                .context("locating vmrun")?,
        ),
        other => bail!("unknown runtime {other:?}: expected native, vm or wasm"),
    };
    Ok(PreparedPod {
        plan,
        images,
        runtime,
        network,
    })
}

/// A wasm container's image must hold WebAssembly at its entry point:
/// refused here, before the pod makes anything, naming the image.
fn check_wasm_image(
    plan: &vmrun_pod::plan::PodPlan,
    c: &vmrun_pod::plan::ContainerPlan,
    layers: &[std::path::PathBuf],
    entrypoint: &[String],
    cmd: &[String],
) -> anyhow::Result<()> {
    if vmrun_pod::wasm::is_native_container(plan, &c.name) {
        return Ok(());
    }
    let argv = vmrun_pod::command::resolve_argv(
        c.command.as_deref(),
        c.args.as_deref(),
        entrypoint,
        cmd,
        &c.env,
    );
    let argv0 = argv.first().map(String::as_str).unwrap_or("");
    vmrun_pod::wasm::image::find_entry(&c.image, layers, argv0).map_err(|e| {
        anyhow::anyhow!(
            "container {:?}: {e} (the wasm runtime runs WebAssembly images; list the container in annotation {} to run it natively in this pod)",
            c.name,
            vmrun_pod::wasm::NATIVE_CONTAINERS_ANNOTATION
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_comes_from_the_flag_then_the_runtime_class() {
        assert_eq!(select_runtime(None, None).unwrap(), "native");
        assert_eq!(select_runtime(None, Some("vm")).unwrap(), "vm");
        assert_eq!(select_runtime(Some("runc"), Some("vm")).unwrap(), "native");
        let err = select_runtime(None, Some("kata")).unwrap_err();
        assert!(err.to_string().contains("spec.runtimeClassName"), "{err}");
    }
}
