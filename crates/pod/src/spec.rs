//! The OCI runtime spec of one container of a pod, as containerd's CRI plugin
//! would generate it: default mounts, masked paths, capabilities, the pod's
//! shared namespaces, cgroup resources, and the pod's volumes.
//!
//! Built as OCI JSON and then typed through `oci-spec`, because the JSON is the
//! format the spec itself defines and reads far better than nested builders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde_json::{json, Value};

use crate::command::resolve_argv;
use crate::plan::{ContainerPlan, PodPlan};

/// What the image contributes.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ImageDefaults {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// Where the pod's namespaces live and what the host side prepared for this container.
#[derive(Debug, Clone)]
pub struct SpecContext<'a> {
    pub pod: &'a PodPlan,
    /// `/proc/<pause>/ns/` of the pod sandbox, when there is one.
    pub sandbox_ns_dir: Option<PathBuf>,
    pub cgroup_path: String,
    pub pids_limit: Option<i64>,
    /// Host directories of the pod's volumes, by volume name.
    pub volume_dirs: &'a BTreeMap<String, PathBuf>,
    /// The pod's shared /dev/shm, /etc/hosts, /etc/hostname, /etc/resolv.conf.
    pub shm_dir: Option<&'a Path>,
    pub etc_files: &'a [(String, PathBuf)],
    /// Whether the host mounts cgroup v2 at /sys/fs/cgroup (then the container gets
    /// a cgroup2 mount, else one per v1 hierarchy).
    pub cgroup2: bool,
    /// The image's rootfs layers, bottom first, for resolving user names in /etc/passwd.
    pub layers: &'a [PathBuf],
    /// The mount point of the /proc view (`vmrun-procview`), when this pod
    /// has it: its files are bind-mounted over the container's.
    pub proc_view: Option<&'a Path>,
    /// The container's cpuset (a kernel CPU list), when it has one.
    pub cpuset: Option<String>,
}

/// Pod annotation that turns the /proc view off (`"false"`) or on (`"true"`, the default).
pub const PROC_VIEW_ANNOTATION: &str = "vmrun.io/proc-view";

/// Whether `pod` wants the /proc view; an annotation value other than
/// true/false is an error naming it.
pub fn proc_view_wanted(pod: &PodPlan) -> Result<bool, String> {
    match pod
        .annotations
        .get(PROC_VIEW_ANNOTATION)
        .map(String::as_str)
    {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(format!(
            "annotation {PROC_VIEW_ANNOTATION}: {other:?} is neither \"true\" nor \"false\""
        )),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("container {container:?}: no command to run: the pod sets no command and the image has no Entrypoint or Cmd")]
    NoCommand { container: String },
    #[error("container {container:?}: user {user:?} not found in the image's /etc/passwd")]
    UnknownUser { container: String, user: String },
    #[error("container {container:?}: the image's user {user:?} is a name, but the image has no /etc/passwd (give a numeric uid or runAsUser)")]
    NoPasswd { container: String, user: String },
    #[error("container {container:?}: group {group:?} not found in the image's /etc/group")]
    UnknownGroup { container: String, group: String },
    #[error("container {container:?}: capability {cap:?} is not a Linux capability")]
    UnknownCapability { container: String, cap: String },
    #[error("container {container:?}: volume {volume:?} was not prepared")]
    MissingVolume { container: String, volume: String },
    #[error("container {container:?}: {source}")]
    Seccomp {
        container: String,
        source: crate::seccomp::ProfileError,
    },
    #[error("container {container:?}: generated spec is invalid: {message}")]
    Invalid { container: String, message: String },
}

/// Default capabilities of a container (containerd's and Docker's set).
pub use vmrun_container::DEFAULT_CAPABILITIES as DEFAULT_CAPS;

const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The default PATH when the image sets none (the one Docker and containerd use).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The process part: what `exec`, probes and hooks reuse with another argv.
pub fn process_json(
    ctx: &SpecContext,
    c: &ContainerPlan,
    image: &ImageDefaults,
    argv: Vec<String>,
) -> Result<Value, SpecError> {
    let env = merged_env(ctx.pod, c, image);
    let (uid, gid) = resolve_user(ctx, c, image)?;
    let caps = capabilities(c, uid)?;
    let no_new_privs =
        !c.security.privileged && c.security.allow_privilege_escalation != Some(true);
    let cwd = c
        .working_dir
        .clone()
        .or_else(|| image.working_dir.clone().filter(|d| !d.is_empty()))
        .unwrap_or_else(|| "/".to_string());
    Ok(json!({
        "terminal": false,
        "user": { "uid": uid, "gid": gid, "additionalGids": c.security.supplemental_groups },
        "args": argv,
        "env": env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "cwd": cwd,
        "capabilities": caps,
        "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": nofile_limit(), "soft": nofile_limit() }],
        "noNewPrivileges": no_new_privs,
    }))
}

/// The whole spec of a container.
pub fn container_spec(
    ctx: &SpecContext,
    c: &ContainerPlan,
    image: &ImageDefaults,
) -> Result<Spec, SpecError> {
    let argv = resolve_argv(
        c.command.as_deref(),
        c.args.as_deref(),
        &image.entrypoint,
        &image.cmd,
        &c.env,
    );
    if argv.is_empty() {
        return Err(SpecError::NoCommand {
            container: c.name.clone(),
        });
    }
    let process = process_json(ctx, c, image, argv)?;
    let privileged = c.security.privileged;

    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", if privileged { "rw" } else { "ro" }]}),
    ];
    // The container's own cgroup (it has a cgroup namespace rooted there),
    // as runc mounts it: cgroup2 on a v2 host, each v1 hierarchy under
    // /sys/fs/cgroup/<controller> on a v1 or hybrid host. Read-only unless
    // privileged.
    mounts.push(json!({
        "destination": "/sys/fs/cgroup",
        "type": if ctx.cgroup2 { "cgroup2" } else { "cgroup" },
        "source": "cgroup",
        "options": ["nosuid", "noexec", "nodev", "relatime", if privileged { "rw" } else { "ro" }],
    }));
    if let Some(view) = ctx.proc_view {
        for f in vmrun_procview::ViewFile::ALL {
            mounts.push(json!({
                "destination": f.container_path(),
                "type": "bind",
                "source": view.join(f.name()),
                "options": ["bind", "ro", "nosuid", "nodev", "noexec"],
            }));
        }
    }
    match ctx.shm_dir {
        Some(shm) => mounts.push(bind(shm, "/dev/shm", false)),
        None => mounts.push(json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]})),
    }
    for (dest, src) in ctx.etc_files {
        // A volume mounted over the same path wins, as in Kubernetes.
        if !c
            .mounts
            .iter()
            .any(|m| m.path.trim_end_matches('/') == dest)
        {
            mounts.push(bind(src, dest, false));
        }
    }
    for m in &c.mounts {
        if let Some(host) = &m.host_path {
            let propagation = match (m.from_host_propagation, m.to_host_propagation) {
                (_, true) => "rshared",
                (true, false) => "rslave",
                (false, false) => "rprivate",
            };
            mounts.push(bind_with(host, &m.path, m.read_only, propagation));
            continue;
        }
        let dir = ctx
            .volume_dirs
            .get(&m.volume)
            .ok_or_else(|| SpecError::MissingVolume {
                container: c.name.clone(),
                volume: m.volume.clone(),
            })?;
        let source = match &m.sub_path {
            Some(sub) => dir.join(sub),
            None => dir.clone(),
        };
        mounts.push(bind(&source, &m.path, m.read_only));
    }

    let pod = ctx.pod;
    let mut namespaces = vec![json!({"type": "mount"}), json!({"type": "cgroup"})];
    let shared = |ty: &str, file: &str| match &ctx.sandbox_ns_dir {
        Some(dir) => json!({"type": ty, "path": dir.join(file)}),
        None => json!({"type": ty}),
    };
    if !pod.host_network {
        namespaces.push(shared("network", "net"));
        namespaces.push(shared("uts", "uts"));
    }
    if !pod.host_ipc {
        namespaces.push(shared("ipc", "ipc"));
    }
    if !pod.host_pid {
        namespaces.push(if pod.share_process_namespace {
            shared("pid", "pid")
        } else {
            json!({"type": "pid"})
        });
    }

    let mut resources = serde_json::Map::new();
    if let Some(limit) = c.resources.memory_limit {
        resources.insert("memory".into(), json!({ "limit": limit }));
    }
    let mut cpu = serde_json::Map::new();
    if let Some(req) = c.resources.cpu_request_milli {
        // The kubelet's mapping of a CPU request to cgroup shares.
        cpu.insert("shares".into(), json!((req * 1024 / 1000).max(2)));
    }
    if let Some(limit) = c.resources.cpu_limit_milli {
        let period = 100_000u64;
        cpu.insert(
            "quota".into(),
            json!(((limit * period) / 1000).max(1000) as i64),
        );
        cpu.insert("period".into(), json!(period));
    }
    if let Some(cpus) = &ctx.cpuset {
        cpu.insert("cpus".into(), json!(cpus));
    }
    if !cpu.is_empty() {
        resources.insert("cpu".into(), Value::Object(cpu));
    }
    if let Some(limit) = ctx.pids_limit {
        resources.insert("pids".into(), json!({ "limit": limit }));
    }

    let sysctl: BTreeMap<_, _> = pod.sysctls.iter().cloned().collect();
    let owned = |paths: &[&str]| paths.iter().map(|p| p.to_string()).collect::<Vec<_>>();
    let masked = match &c.security.masked_paths {
        Some(paths) => paths.clone(),
        None if privileged => Vec::new(),
        None => owned(MASKED_PATHS),
    };
    let readonly = match &c.security.readonly_paths {
        Some(paths) => paths.clone(),
        None if privileged => Vec::new(),
        None => owned(READONLY_PATHS),
    };
    // A mount that takes the host's new mounts needs the root to be a
    // slave too (shared for one that gives them back), or the propagation
    // stops there.
    let rootfs_propagation = if c.mounts.iter().any(|m| m.to_host_propagation) {
        "rshared"
    } else if c.mounts.iter().any(|m| m.from_host_propagation) {
        "rslave"
    } else {
        "rprivate"
    };
    let seccomp = crate::seccomp::linux_seccomp(
        &c.security.seccomp,
        c.security.privileged,
        &c.security.caps_add,
    )
    .map_err(|source| SpecError::Seccomp {
        container: c.name.clone(),
        source,
    })?;
    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": { "path": "rootfs", "readonly": c.security.read_only_root },
        // With the host's UTS namespace the host's name stays the container's.
        "hostname": if pod.host_network { Value::Null } else { json!(pod.hostname) },
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": ctx.cgroup_path,
            "resources": resources,
            "maskedPaths": masked,
            "readonlyPaths": readonly,
            "rootfsPropagation": rootfs_propagation,
            "sysctl": sysctl,
        },
        "annotations": {
            "io.kubernetes.pod.name": pod.name,
            "io.kubernetes.pod.namespace": pod.namespace,
            "io.kubernetes.pod.uid": pod.uid,
            "io.kubernetes.container.name": c.name,
        },
    });
    if let Some(profile) = seccomp {
        spec["linux"]["seccomp"] = profile;
    }
    serde_json::from_value(spec).map_err(|e| SpecError::Invalid {
        container: c.name.clone(),
        message: e.to_string(),
    })
}

/// containerd's 1048576 open files, capped by what this host allows (raising a
/// hard limit needs CAP_SYS_RESOURCE, which not every host grants).
fn nofile_limit() -> u64 {
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard)
        .unwrap_or(1024);
    hard.min(1_048_576)
}

fn bind(source: &Path, destination: &str, read_only: bool) -> Value {
    bind_with(source, destination, read_only, "rprivate")
}

fn bind_with(source: &Path, destination: &str, read_only: bool, propagation: &str) -> Value {
    let mut options = vec!["rbind", propagation];
    if read_only {
        options.push("ro");
    }
    json!({"destination": destination, "type": "bind", "source": source, "options": options})
}

/// Image env first, then the pod's (which wins), plus PATH and HOSTNAME defaults.
pub fn merged_env(
    pod: &PodPlan,
    c: &ContainerPlan,
    image: &ImageDefaults,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        if let Some(slot) = env.iter_mut().find(|(name, _)| name == k) {
            slot.1 = v.to_string();
        } else {
            env.push((k.to_string(), v.to_string()));
        }
    };
    set("PATH", DEFAULT_PATH);
    set("HOSTNAME", &pod.hostname);
    for entry in &image.env {
        let (k, v) = entry.split_once('=').unwrap_or((entry, ""));
        set(k, v);
    }
    for (k, v) in &c.env {
        set(k, v);
    }
    env
}

fn capabilities(c: &ContainerPlan, uid: u32) -> Result<Value, SpecError> {
    let normalize = |cap: &str| {
        let upper = cap.to_ascii_uppercase();
        if upper == "ALL" {
            Ok(upper)
        } else {
            let full = if upper.starts_with("CAP_") {
                upper
            } else {
                format!("CAP_{upper}")
            };
            if ALL_CAPS.contains(&full.as_str()) {
                Ok(full)
            } else {
                Err(SpecError::UnknownCapability {
                    container: c.name.clone(),
                    cap: cap.to_string(),
                })
            }
        }
    };
    let mut set: Vec<String> = if c.security.privileged {
        ALL_CAPS.iter().map(|s| s.to_string()).collect()
    } else {
        DEFAULT_CAPS.iter().map(|s| s.to_string()).collect()
    };
    for cap in &c.security.caps_add {
        let cap = normalize(cap)?;
        if cap == "ALL" {
            set = ALL_CAPS.iter().map(|s| s.to_string()).collect();
        } else if !set.contains(&cap) {
            set.push(cap);
        }
    }
    for cap in &c.security.caps_drop {
        let cap = normalize(cap)?;
        if cap == "ALL" {
            set.clear();
        } else {
            set.retain(|c| *c != cap);
        }
    }
    // Privileged and ALL mean every capability this runtime holds itself (as
    // containerd does): a host that withholds some (CAP_SYS_RESOURCE on
    // this machine) cannot grant them, and asking would fail the start.
    if let Ok(own) = caps::read(None, caps::CapSet::Bounding) {
        let own: Vec<String> = own.iter().map(|c| c.to_string()).collect();
        set.retain(|c| own.contains(c));
    }
    // A non-root process starts with no effective capabilities, as under Docker:
    // they stay in the bounding set for setuid binaries.
    let active = if uid == 0 { set.clone() } else { Vec::new() };
    Ok(json!({ "bounding": set, "effective": active, "permitted": active }))
}

/// runAsUser/runAsGroup, else the image's USER (`uid`, `uid:gid`, `name`, `name:group`).
fn resolve_user(
    ctx: &SpecContext,
    c: &ContainerPlan,
    image: &ImageDefaults,
) -> Result<(u32, u32), SpecError> {
    let image_user = image.user.clone().unwrap_or_default();
    let (user_part, group_part) = match image_user.split_once(':') {
        Some((u, g)) => (u.to_string(), Some(g.to_string())),
        None => (image_user.clone(), None),
    };
    let passwd = read_image_file(ctx.layers, "etc/passwd");
    let (uid, passwd_gid) = match c.security.run_as_user {
        Some(uid) => (uid, lookup_passwd_uid(passwd.as_deref(), uid)),
        None if user_part.is_empty() => (0, Some(0)),
        None => match user_part.parse::<u32>() {
            Ok(uid) => (uid, lookup_passwd_uid(passwd.as_deref(), uid)),
            Err(_) if passwd.is_none() => {
                return Err(SpecError::NoPasswd {
                    container: c.name.clone(),
                    user: user_part.clone(),
                })
            }
            Err(_) => {
                let (uid, gid) =
                    lookup_passwd_name(passwd.as_deref(), &user_part).ok_or_else(|| {
                        SpecError::UnknownUser {
                            container: c.name.clone(),
                            user: user_part.clone(),
                        }
                    })?;
                (uid, Some(gid))
            }
        },
    };
    let gid = match (c.security.run_as_group, &group_part) {
        (Some(gid), _) => gid,
        (None, Some(g)) if c.security.run_as_user.is_none() => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup_group(read_image_file(ctx.layers, "etc/group").as_deref(), g)
                .ok_or_else(|| SpecError::UnknownGroup {
                    container: c.name.clone(),
                    group: g.clone(),
                })?,
        },
        _ => passwd_gid.unwrap_or(0),
    };
    Ok((uid, gid))
}

/// Reads a file from the topmost layer that has it (whiteouts are not consulted:
/// /etc/passwd is never deleted by a layer in practice).
fn read_image_file(layers: &[PathBuf], rel: &str) -> Option<String> {
    layers.iter().rev().find_map(|layer| {
        let path = layer.join(rel);
        // Never follow a symlink out of the layer.
        let meta = std::fs::symlink_metadata(&path).ok()?;
        if !meta.is_file() {
            return None;
        }
        std::fs::read_to_string(path).ok()
    })
}

fn lookup_passwd_uid(passwd: Option<&str>, uid: u32) -> Option<u32> {
    passwd?.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 4 && f[2].parse() == Ok(uid))
            .then(|| f[3].parse().ok())
            .flatten()
    })
}

fn lookup_passwd_name(passwd: Option<&str>, name: &str) -> Option<(u32, u32)> {
    passwd?.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            Some((f[2].parse().ok()?, f[3].parse().ok()?))
        } else {
            None
        }
    })
}

fn lookup_group(group: Option<&str>, name: &str) -> Option<u32> {
    group?.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 3 && f[0] == name)
            .then(|| f[2].parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(yaml: &str) -> PodPlan {
        let manifest = crate::manifest::parse("t.yaml", yaml).unwrap();
        crate::plan::plan(&manifest, "uid-1", "node-1").unwrap()
    }

    fn spec_of(pod: &PodPlan, cgroup2: bool, view: Option<&Path>) -> Spec {
        let dirs = BTreeMap::new();
        let ctx = SpecContext {
            pod,
            sandbox_ns_dir: None,
            cgroup_path: "/vmrun/uid-1/c".into(),
            pids_limit: None,
            volume_dirs: &dirs,
            shm_dir: None,
            etc_files: &[],
            cgroup2,
            layers: &[],
            proc_view: view,
            cpuset: Some("1".into()),
        };
        let image = ImageDefaults {
            cmd: vec!["sh".into()],
            ..ImageDefaults::default()
        };
        container_spec(&ctx, &pod.containers[0], &image).unwrap()
    }

    fn mount_at<'a>(spec: &'a Spec, dest: &str) -> Option<&'a oci_spec::runtime::Mount> {
        spec.mounts()
            .iter()
            .flatten()
            .find(|m| m.destination() == Path::new(dest))
    }

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n  - name: c\n    image: busybox\n";

    /// The (uid, gid) the container runs as, for an image whose only layer holds `files`
    /// and whose config says `User: user`.
    fn user_of(files: &[(&str, &str)], user: &str, pod: &str) -> Result<(u32, u32), SpecError> {
        let layer = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let path = layer.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            match content.strip_prefix("symlink:") {
                Some(target) => std::os::unix::fs::symlink(target, path).unwrap(),
                None => std::fs::write(path, content).unwrap(),
            }
        }
        let pod = plan_of(pod);
        let dirs = BTreeMap::new();
        let layers = [layer.path().to_path_buf()];
        let ctx = SpecContext {
            pod: &pod,
            sandbox_ns_dir: None,
            cgroup_path: "/vmrun/uid-1/c".into(),
            pids_limit: None,
            volume_dirs: &dirs,
            shm_dir: None,
            etc_files: &[],
            cgroup2: true,
            layers: &layers,
            proc_view: None,
            cpuset: None,
        };
        let image = ImageDefaults {
            cmd: vec!["sh".into()],
            user: Some(user.to_string()),
            ..ImageDefaults::default()
        };
        let spec = container_spec(&ctx, &pod.containers[0], &image)?;
        let u = spec.process().as_ref().unwrap().user();
        Ok((u.uid(), u.gid()))
    }

    #[test]
    fn setuid_programs_gain_nothing_unless_escalation_is_allowed() {
        let nnp = |extra: &str| {
            let pod = plan_of(&format!("{POD}{extra}"));
            spec_of(&pod, true, None)
                .process()
                .as_ref()
                .unwrap()
                .no_new_privileges()
        };
        assert_eq!(nnp(""), Some(true));
        assert_eq!(
            nnp("    securityContext: {allowPrivilegeEscalation: false}\n"),
            Some(true)
        );
        assert_eq!(
            nnp("    securityContext: {allowPrivilegeEscalation: true}\n"),
            Some(false)
        );
        assert_eq!(
            nnp("    securityContext: {privileged: true}\n"),
            Some(false)
        );
    }

    #[test]
    fn image_users_that_the_image_does_not_have() {
        const PASSWD: (&str, &str) = (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1001::/home/web:/bin/sh\n",
        );
        const GROUP: (&str, &str) = ("etc/group", "root:x:0:\nstaff:x:50:\n");
        // Numeric users need no /etc/passwd, as under Docker and containerd.
        assert_eq!(user_of(&[], "1234:5678", POD).unwrap(), (1234, 5678));
        assert_eq!(user_of(&[], "1234", POD).unwrap(), (1234, 0));
        assert_eq!(user_of(&[PASSWD], "1234", POD).unwrap(), (1234, 0));
        assert_eq!(user_of(&[PASSWD], "1000", POD).unwrap(), (1000, 1001));
        assert_eq!(user_of(&[PASSWD], "web", POD).unwrap(), (1000, 1001));
        assert_eq!(
            user_of(&[PASSWD, GROUP], "web:staff", POD).unwrap(),
            (1000, 50)
        );
        // A name the image cannot resolve is an error naming the container and the user.
        let err = user_of(&[], "nobody", POD).unwrap_err().to_string();
        assert_eq!(err, "container \"c\": the image's user \"nobody\" is a name, but the image has no /etc/passwd (give a numeric uid or runAsUser)");
        let err = user_of(&[PASSWD], "nobody", POD).unwrap_err().to_string();
        assert_eq!(
            err,
            "container \"c\": user \"nobody\" not found in the image's /etc/passwd"
        );
        let err = user_of(&[PASSWD], "web:wheel", POD)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "container \"c\": group \"wheel\" not found in the image's /etc/group"
        );
        // runAsUser wins over the image's user, known or not.
        let as_user = format!("{POD}    securityContext: {{runAsUser: 4321, runAsGroup: 99}}\n");
        assert_eq!(user_of(&[], "nobody", &as_user).unwrap(), (4321, 99));
        // An /etc/passwd that is a symlink (to the host's) is not followed.
        let err = user_of(&[("etc/passwd", "symlink:/etc/passwd")], "root", POD)
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no /etc/passwd"), "{err}");
    }

    #[test]
    fn the_cgroup_fs_is_read_only_unless_privileged() {
        let pod = plan_of(POD);
        for (cgroup2, typ) in [(true, "cgroup2"), (false, "cgroup")] {
            let spec = spec_of(&pod, cgroup2, None);
            let m = mount_at(&spec, "/sys/fs/cgroup").expect("a cgroup mount");
            assert_eq!(m.typ().as_deref(), Some(typ));
            assert!(m.options().as_ref().unwrap().contains(&"ro".to_string()));
        }
        let privileged = plan_of(&format!("{POD}    securityContext: {{privileged: true}}\n"));
        let spec = spec_of(&privileged, false, None);
        let m = mount_at(&spec, "/sys/fs/cgroup").unwrap();
        assert!(m.options().as_ref().unwrap().contains(&"rw".to_string()));
    }

    #[test]
    fn the_proc_view_binds_its_files_read_only_with_the_cpuset() {
        let pod = plan_of(POD);
        let spec = spec_of(&pod, true, Some(Path::new("/run/vmrun/procview")));
        for f in vmrun_procview::ViewFile::ALL {
            let m = mount_at(&spec, f.container_path())
                .unwrap_or_else(|| panic!("no mount on {}", f.container_path()));
            assert_eq!(
                m.source().as_deref(),
                Some(Path::new("/run/vmrun/procview").join(f.name()).as_path())
            );
            assert!(m.options().as_ref().unwrap().contains(&"ro".to_string()));
        }
        let cpus = spec
            .linux()
            .as_ref()
            .unwrap()
            .resources()
            .as_ref()
            .unwrap()
            .cpu()
            .as_ref()
            .unwrap()
            .cpus()
            .clone();
        assert_eq!(cpus.as_deref(), Some("1"));
        assert!(mount_at(&spec_of(&pod, true, None), "/proc/meminfo").is_none());
    }

    #[test]
    fn the_proc_view_annotation_is_true_or_false() {
        let with = |v: &str| {
            plan_of(&POD.replace(
                "  name: p\n",
                &format!("  name: p\n  annotations:\n    vmrun.io/proc-view: \"{v}\"\n"),
            ))
        };
        assert_eq!(proc_view_wanted(&plan_of(POD)), Ok(true));
        assert_eq!(proc_view_wanted(&with("false")), Ok(false));
        let err = proc_view_wanted(&with("nope")).unwrap_err();
        assert!(
            err.contains("vmrun.io/proc-view") && err.contains("\"nope\""),
            "{err}"
        );
    }
}
