//! The container's filesystem view: planned in the parent from the spec
//! (validation, option parsing, host lookups), then performed by the
//! container init inside its new mount namespace through the [`Syscall`]
//! seam:
//!
//! 1. make `/` private (nothing we do propagates back to the host),
//! 2. mount the rootfs (bind of a directory, or overlay of image layers —
//!    inside the namespace, so it vanishes with it),
//! 3. `mounts` in order, destinations resolved inside the rootfs,
//! 4. `/dev` devices and symlinks,
//! 5. `pivot_root`, then hostname, sysctls, readonly and masked paths and
//!    the read-only root.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::stat::SFlag;
use oci_spec::runtime::{LinuxDeviceType, Spec};

use crate::container::Rootfs;
use crate::mount_options::{self, MountOptions};
use crate::namespaces::NamespacePlan;
use crate::path_lookup::errno_text;
use crate::resolve::resolve_in_root;
use crate::syscall::Syscall;

/// A failure inside the container setup, as text (it crosses the process
/// boundary over the channel). Always names what failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SetupError(pub String);

fn fail(what: impl std::fmt::Display, e: io::Error) -> SetupError {
    SetupError(format!("{what}: {}", errno_text(&e)))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RootSource {
    /// Bind-mount this directory onto itself.
    Bind(PathBuf),
    /// Mount an overlay with these options on the root path.
    Overlay(String),
}

#[derive(Debug, Clone)]
pub(crate) struct MountPlan {
    pub destination: PathBuf,
    pub typ: Option<String>,
    pub source: Option<PathBuf>,
    pub options: MountOptions,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DevicePlan {
    pub path: PathBuf,
    pub kind: SFlag,
    pub major: u64,
    pub minor: u64,
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// One v1 hierarchy to re-create under a `cgroup` mount on a v1 host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupV1Mount {
    pub name: String,
    pub options: String,
}

#[derive(Debug, Clone)]
pub(crate) struct RootfsPlan {
    /// False when the mount namespace is joined (`path` set): the process
    /// then runs in that namespace's filesystem as it is, like `exec`, and
    /// only hostname and sysctls are applied.
    pub build_rootfs: bool,
    pub source: RootSource,
    pub root: PathBuf,
    pub readonly: bool,
    pub propagation: MsFlags,
    pub mounts: Vec<MountPlan>,
    pub setup_dev: bool,
    pub devices: Vec<DevicePlan>,
    pub masked_paths: Vec<PathBuf>,
    pub readonly_paths: Vec<PathBuf>,
    pub sysctls: Vec<(String, String)>,
    pub hostname: Option<String>,
    /// None: the host is cgroup v2 (a `cgroup` mount becomes cgroup2).
    pub cgroup_v1: Option<Vec<CgroupV1Mount>>,
}

const DEFAULT_DEVICES: [(&str, u64, u64); 6] = [
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
];

const DEV_SYMLINKS: [(&str, &str); 6] = [
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
    ("pts/ptmx", "/dev/ptmx"),
    ("/proc/kcore", "/dev/core"),
];

/// Sysctls that live in a namespace the container may own, and which one.
fn sysctl_namespace(key: &str) -> Option<CloneFlags> {
    const IPC: [&str; 8] = [
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    if IPC.contains(&key) || key.starts_with("fs.mqueue.") {
        Some(CloneFlags::CLONE_NEWIPC)
    } else if key.starts_with("net.") {
        Some(CloneFlags::CLONE_NEWNET)
    } else if key == "kernel.hostname" || key == "kernel.domainname" {
        Some(CloneFlags::CLONE_NEWUTS)
    } else {
        None
    }
}

pub(crate) fn check_sysctl(key: &str, ns: &NamespacePlan) -> Result<(), String> {
    let well_formed = !key.is_empty()
        && !key.contains('/')
        && key.split('.').all(|p| !p.is_empty())
        && key.bytes().all(|b| b.is_ascii_graphic());
    if !well_formed {
        return Err(format!("sysctl {key:?}: invalid key"));
    }
    match sysctl_namespace(key) {
        Some(flag) if ns.has(flag) => Ok(()),
        Some(_) => Err(format!(
            "sysctl {key:?} requires the container to have its own {} namespace",
            match key {
                k if k.starts_with("net.") => "network",
                "kernel.hostname" | "kernel.domainname" => "uts",
                _ => "ipc",
            }
        )),
        None => Err(format!(
            "sysctl {key:?} is not in a separate kernel namespace and cannot be set per container"
        )),
    }
}

/// Overlay options: overlayfs wants the *top* layer first.
pub(crate) fn overlay_data(lower: &[PathBuf], upper: &Path, work: &Path) -> Result<String, String> {
    if lower.is_empty() {
        return Err("overlay rootfs needs at least one lower layer".into());
    }
    for p in lower.iter().map(PathBuf::as_path).chain([upper, work]) {
        let s = p.to_string_lossy();
        if !p.is_absolute() || s.contains(',') || s.contains(':') {
            return Err(format!(
                "overlay path {s:?} must be absolute and free of ',' and ':'"
            ));
        }
    }
    let lowers: Vec<String> = lower
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        upper.display(),
        work.display()
    );
    // mount(2) copies at most one page of options.
    if data.len() >= 4096 {
        return Err(format!(
            "overlay mount options are {} bytes, more than the kernel's 4095 (too many layers or long paths)",
            data.len()
        ));
    }
    Ok(data)
}

/// The v1 hierarchies mounted on the host, from /proc/self/mountinfo and
/// /proc/cgroups (which names the real controllers among the mount options).
fn host_cgroup_v1_mounts() -> Vec<CgroupV1Mount> {
    let controllers: Vec<String> = std::fs::read_to_string("/proc/cgroups")
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<CgroupV1Mount> = Vec::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = right.split_whitespace();
        if r.next() != Some("cgroup") {
            continue;
        }
        let super_opts = r.nth(1).unwrap_or("");
        let Some(mountpoint) = left.split_whitespace().nth(4) else {
            continue;
        };
        let Some(name) = Path::new(mountpoint).file_name() else {
            continue;
        };
        let mut opts: Vec<&str> = super_opts
            .split(',')
            .filter(|o| o.starts_with("name=") || controllers.iter().any(|c| c == o))
            .collect();
        if opts.is_empty() {
            continue;
        }
        if opts.iter().all(|o| o.starts_with("name=")) {
            opts.insert(0, "none");
        }
        let m = CgroupV1Mount {
            name: name.to_string_lossy().into_owned(),
            options: opts.join(","),
        };
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out
}

fn device_kind(t: LinuxDeviceType) -> Result<SFlag, String> {
    match t {
        LinuxDeviceType::C | LinuxDeviceType::U => Ok(SFlag::S_IFCHR),
        LinuxDeviceType::B => Ok(SFlag::S_IFBLK),
        LinuxDeviceType::P => Ok(SFlag::S_IFIFO),
        LinuxDeviceType::A => Err("device type \"a\" cannot be created".into()),
    }
}

fn absolute(what: &str, p: &Path) -> Result<PathBuf, String> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Err(format!("{what} {p:?} must be an absolute path"))
    }
}

/// `root` is where the rootfs will be mounted: the directory itself for
/// [`Rootfs::Dir`], `spec.root.path` for [`Rootfs::Overlay`].
pub(crate) fn plan(
    spec: &Spec,
    rootfs: &Rootfs,
    root: PathBuf,
    ns: &NamespacePlan,
) -> Result<RootfsPlan, String> {
    let source = match rootfs {
        Rootfs::Dir(p) => RootSource::Bind(p.clone()),
        Rootfs::Overlay { lower, upper, work } => {
            RootSource::Overlay(overlay_data(lower, upper, work)?)
        }
    };
    let linux = spec.linux().clone().unwrap_or_default();
    let propagation = match linux.rootfs_propagation().as_deref() {
        None | Some("") | Some("private") | Some("rprivate") => {
            MsFlags::MS_PRIVATE | MsFlags::MS_REC
        }
        Some("slave") | Some("rslave") => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        Some("shared") | Some("rshared") => MsFlags::MS_SHARED | MsFlags::MS_REC,
        Some(other) => return Err(format!("rootfsPropagation {other:?} is not supported")),
    };
    let mut mounts = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let destination = absolute("mount destination", m.destination())?;
        let options = mount_options::parse(m.options().as_deref().unwrap_or_default())
            .map_err(|e| format!("mount {}: {e}", destination.display()))?;
        let is_bind = options.is_bind() || m.typ().as_deref() == Some("bind");
        if is_bind && m.source().is_none() {
            return Err(format!("bind mount {}: no source", destination.display()));
        }
        let mut options = options;
        if is_bind {
            options.flags.insert(MsFlags::MS_BIND);
        }
        mounts.push(MountPlan {
            destination,
            typ: m.typ().clone(),
            source: m.source().clone(),
            options,
        });
    }
    let setup_dev = !mounts
        .iter()
        .any(|m| m.destination == Path::new("/dev") && m.options.is_bind());

    let mut devices: Vec<DevicePlan> = DEFAULT_DEVICES
        .iter()
        .map(|(p, major, minor)| DevicePlan {
            path: PathBuf::from(p),
            kind: SFlag::S_IFCHR,
            major: *major,
            minor: *minor,
            mode: 0o666,
            uid: None,
            gid: None,
        })
        .collect();
    for d in linux.devices().iter().flatten() {
        let path = absolute("device path", d.path())?;
        let plan = DevicePlan {
            kind: device_kind(d.typ()).map_err(|e| format!("device {}: {e}", path.display()))?,
            major: d.major() as u64,
            minor: d.minor() as u64,
            mode: d.file_mode().unwrap_or(0o666) & 0o7777,
            uid: d.uid(),
            gid: d.gid(),
            path,
        };
        devices.retain(|x| x.path != plan.path);
        devices.push(plan);
    }

    let paths = |v: &Option<Vec<String>>, what: &str| -> Result<Vec<PathBuf>, String> {
        v.iter()
            .flatten()
            .map(|p| absolute(what, Path::new(p)))
            .collect()
    };
    let mut sysctls: Vec<(String, String)> = linux
        .sysctl()
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    sysctls.sort();
    for (k, _) in &sysctls {
        check_sysctl(k, ns)?;
    }
    let hostname = match spec.hostname().as_deref().filter(|h| !h.is_empty()) {
        None => None,
        Some(h) if ns.is_new(CloneFlags::CLONE_NEWUTS) => Some(h.to_string()),
        // Joined (the pod's) UTS namespace: the pod owns the hostname.
        Some(_) if ns.is_joined(CloneFlags::CLONE_NEWUTS) => None,
        Some(_) => return Err("hostname is set but the container has no UTS namespace".into()),
    };
    let wants_cgroup_fs = mounts
        .iter()
        .any(|m| matches!(m.typ.as_deref(), Some("cgroup") | Some("cgroup2")));
    let cgroup_v1 = (wants_cgroup_fs
        && crate::cgroups::detect_version(Path::new(crate::cgroups::DEFAULT_ROOT))
            == crate::cgroups::CgroupVersion::V1)
        .then(host_cgroup_v1_mounts);

    let build_rootfs = ns.is_new(CloneFlags::CLONE_NEWNS);
    if !build_rootfs && !mounts.is_empty() {
        tracing::warn!("mount namespace is joined: spec mounts, devices and masked/readonly paths are not applied");
    }
    Ok(RootfsPlan {
        build_rootfs,
        source,
        root,
        readonly: spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false),
        propagation,
        mounts,
        setup_dev,
        devices,
        masked_paths: paths(linux.masked_paths(), "masked path")?,
        readonly_paths: paths(linux.readonly_paths(), "readonly path")?,
        sysctls,
        hostname,
        cgroup_v1,
    })
}

fn resolve(root: &Path, p: &Path) -> Result<PathBuf, SetupError> {
    resolve_in_root(root, p).map_err(|e| fail(format!("resolve {} in rootfs", p.display()), e))
}

fn describe(m: &MountPlan) -> String {
    format!(
        "mount {:?} on {:?} (type {})",
        m.source
            .as_deref()
            .unwrap_or(Path::new(""))
            .display()
            .to_string(),
        m.destination.display().to_string(),
        m.typ.as_deref().unwrap_or("bind")
    )
}

fn mount_cgroup_fs(
    plan: &RootfsPlan,
    m: &MountPlan,
    dest: &Path,
    sys: &dyn Syscall,
) -> Result<(), SetupError> {
    let flags = m.options.flags;
    let what = describe(m);
    sys.mkdir_all(dest, 0o755)
        .map_err(|e| fail(format!("{what}: mkdir"), e))?;
    let Some(hierarchies) = &plan.cgroup_v1 else {
        return sys
            .mount(
                Some(Path::new("cgroup2")),
                dest,
                Some("cgroup2"),
                flags,
                None,
            )
            .map_err(|e| fail(&what, e));
    };
    // v1: a tmpfs holding one mount per hierarchy, like runc builds it.
    let tmpfs_flags = flags - MsFlags::MS_RDONLY;
    sys.mount(
        Some(Path::new("tmpfs")),
        dest,
        Some("tmpfs"),
        tmpfs_flags,
        Some("mode=755"),
    )
    .map_err(|e| fail(format!("{what}: tmpfs"), e))?;
    for h in hierarchies {
        let sub = dest.join(&h.name);
        sys.mkdir_all(&sub, 0o755)
            .map_err(|e| fail(format!("{what}: mkdir {}", h.name), e))?;
        sys.mount(
            Some(Path::new("cgroup")),
            &sub,
            Some("cgroup"),
            flags,
            Some(&h.options),
        )
        .map_err(|e| fail(format!("{what}: hierarchy {}", h.options), e))?;
        for alias in h.name.split(',').filter(|a| *a != h.name) {
            match sys.symlink(Path::new(&h.name), &dest.join(alias)) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(fail(format!("{what}: symlink {alias}"), e))
                }
                _ => {}
            }
        }
    }
    if flags.contains(MsFlags::MS_RDONLY) {
        sys.mount(
            Some(Path::new("tmpfs")),
            dest,
            Some("tmpfs"),
            flags | MsFlags::MS_REMOUNT,
            Some("mode=755"),
        )
        .map_err(|e| fail(format!("{what}: remount read-only"), e))?;
    }
    Ok(())
}

fn mount_one(plan: &RootfsPlan, m: &MountPlan, sys: &dyn Syscall) -> Result<(), SetupError> {
    let dest = resolve(&plan.root, &m.destination)?;
    let what = describe(m);
    let typ = m.typ.as_deref().unwrap_or("");
    if m.options.is_bind() {
        let src = m.source.as_deref().unwrap_or(Path::new(""));
        let meta = std::fs::metadata(src).map_err(|e| fail(format!("{what}: stat source"), e))?;
        if meta.is_dir() {
            sys.mkdir_all(&dest, 0o755)
                .map_err(|e| fail(format!("{what}: mkdir"), e))?;
        } else {
            if let Some(parent) = dest.parent() {
                sys.mkdir_all(parent, 0o755)
                    .map_err(|e| fail(format!("{what}: mkdir"), e))?;
            }
            // An existing file is the mount point as it is (it may sit on a
            // read-only filesystem, as /sys/devices/system/cpu/online does).
            if std::fs::symlink_metadata(&dest).is_err() {
                sys.create_file(&dest, 0o644)
                    .map_err(|e| fail(format!("{what}: create mount point"), e))?;
            }
        }
        let bind = MsFlags::MS_BIND | (m.options.flags & MsFlags::MS_REC);
        sys.mount(Some(src), &dest, None, bind, None)
            .map_err(|e| fail(&what, e))?;
        // Per-mount flags (ro, nosuid, ...) only take effect on a remount.
        let rest = m.options.flags - (MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        if !rest.is_empty() {
            sys.mount(
                None,
                &dest,
                None,
                rest | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                None,
            )
            .map_err(|e| fail(format!("{what}: remount with flags"), e))?;
        }
    } else if typ == "cgroup" || typ == "cgroup2" {
        mount_cgroup_fs(plan, m, &dest, sys)?;
    } else {
        sys.mkdir_all(&dest, 0o755)
            .map_err(|e| fail(format!("{what}: mkdir"), e))?;
        let source = m.source.clone().unwrap_or_else(|| PathBuf::from(typ));
        let data = Some(m.options.data.as_str()).filter(|d| !d.is_empty());
        sys.mount(Some(&source), &dest, Some(typ), m.options.flags, data)
            .map_err(|e| fail(&what, e))?;
    }
    for p in &m.options.propagation {
        sys.mount(None, &dest, None, *p, None)
            .map_err(|e| fail(format!("{what}: set propagation"), e))?;
    }
    Ok(())
}

fn create_devices(plan: &RootfsPlan, sys: &dyn Syscall) -> Result<(), SetupError> {
    for d in &plan.devices {
        let path = resolve(&plan.root, &d.path)?;
        let what = format!("create device {}", d.path.display());
        if let Some(parent) = path.parent() {
            sys.mkdir_all(parent, 0o755).map_err(|e| fail(&what, e))?;
        }
        let dev = nix::sys::stat::makedev(d.major, d.minor);
        match sys.mknod(&path, d.kind, d.mode, dev) {
            // The image already has something there; leave it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            r => r.map_err(|e| fail(&what, e))?,
        }
        if d.uid.is_some() || d.gid.is_some() {
            sys.chown(&path, d.uid, d.gid).map_err(|e| fail(&what, e))?;
        }
    }
    for (target, link) in DEV_SYMLINKS {
        let path = resolve(&plan.root, Path::new(link))?;
        match sys.symlink(Path::new(target), &path) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(fail(format!("symlink {link} -> {target}"), e))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Everything up to and including pivot_root. Runs in the container init.
pub(crate) fn prepare(plan: &RootfsPlan, sys: &dyn Syscall) -> Result<(), SetupError> {
    if !plan.build_rootfs {
        return Ok(());
    }
    sys.mount(None, Path::new("/"), None, plan.propagation, None)
        .map_err(|e| {
            fail(
                "set the propagation of / in the container mount namespace",
                e,
            )
        })?;
    let shared = plan.propagation.contains(MsFlags::MS_SHARED);
    if shared {
        // Mounts stay peers of the host's (what bidirectional mounts need),
        // but the rootfs itself must not appear on the host, and
        // pivot_root refuses a shared parent: the mount the rootfs sits on
        // is made private, here only.
        let parent = mount_point_of(&plan.root)
            .map_err(|e| fail(format!("find the mount holding {}", plan.root.display()), e))?;
        sys.mount(None, &parent, None, MsFlags::MS_PRIVATE, None)
            .map_err(|e| fail(format!("make {} private", parent.display()), e))?;
    }
    match &plan.source {
        RootSource::Bind(dir) => sys
            .mount(
                Some(dir),
                &plan.root,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            )
            .map_err(|e| fail(format!("bind mount rootfs {}", dir.display()), e))?,
        RootSource::Overlay(data) => sys
            .mount(
                Some(Path::new("overlay")),
                &plan.root,
                Some("overlay"),
                MsFlags::empty(),
                Some(data),
            )
            .map_err(|e| {
                fail(
                    format!("mount overlay rootfs on {} ({data})", plan.root.display()),
                    e,
                )
            })?,
    }
    for m in &plan.mounts {
        mount_one(plan, m, sys)?;
    }
    if plan.setup_dev {
        create_devices(plan, sys)?;
    }
    // pivot_root(".", ".") stacks the old root on top of the new one; the
    // detach then drops it, so no directory for the old root is needed.
    // With shared propagation the old root is needed after the pivot, when
    // no path reaches it any more: kept open.
    let old_root = match shared {
        true => Some(std::fs::File::open("/").map_err(|e| fail("open the old root", e))?),
        false => None,
    };
    sys.chdir(&plan.root)
        .map_err(|e| fail(format!("chdir to rootfs {}", plan.root.display()), e))?;
    sys.pivot_root(Path::new("."), Path::new("."))
        .map_err(|e| fail(format!("pivot_root to {}", plan.root.display()), e))?;
    if let Some(old_root) = old_root {
        // The old root's mounts are the host's peers: detaching them must
        // not unmount anything on the host. "." is the new root until we
        // stand in the old one.
        sys.fchdir(std::os::fd::AsFd::as_fd(&old_root))
            .map_err(|e| fail("chdir to the old root", e))?;
        sys.mount(
            None,
            Path::new("."),
            None,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None,
        )
        .map_err(|e| fail("make the old root a slave", e))?;
    }
    sys.umount2(Path::new("."), MntFlags::MNT_DETACH)
        .map_err(|e| fail("detach the old root", e))?;
    sys.chdir(Path::new("/"))
        .map_err(|e| fail("chdir to /", e))?;
    Ok(())
}

/// The mount point of the mount that holds `path` in this process's mount
/// namespace: the longest mount point of /proc/self/mountinfo above it.
fn mount_point_of(path: &Path) -> io::Result<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    let best = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount_field(field)))
        .filter(|point| path.starts_with(point))
        .max_by_key(|point| point.components().count());
    best.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no mount holds it"))
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| {
            (b'0'..=b'3').contains(&d[0]) && d.iter().all(|c| (b'0'..=b'7').contains(c))
        });
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn exists(p: &Path) -> Option<std::fs::Metadata> {
    std::fs::metadata(p).ok()
}

/// After pivot_root: hostname, sysctls, readonly and masked paths, ro root.
pub(crate) fn finalize(plan: &RootfsPlan, sys: &dyn Syscall) -> Result<(), SetupError> {
    if let Some(h) = &plan.hostname {
        sys.sethostname(h)
            .map_err(|e| fail(format!("sethostname {h:?}"), e))?;
    }
    for (key, value) in &plan.sysctls {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        sys.write_file(&path, value.as_bytes()).map_err(|e| {
            fail(
                format!("sysctl {key:?}={value:?}: write {}", path.display()),
                e,
            )
        })?;
    }
    for p in &plan.readonly_paths {
        if exists(p).is_none() {
            continue;
        }
        let what = format!("make {} read-only", p.display());
        sys.mount(Some(p), p, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)
            .map_err(|e| fail(&what, e))?;
        sys.mount(
            None,
            p,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        )
        .map_err(|e| fail(&what, e))?;
    }
    for p in &plan.masked_paths {
        let Some(meta) = exists(p) else { continue };
        let what = format!("mask {}", p.display());
        if meta.is_dir() {
            sys.mount(
                Some(Path::new("tmpfs")),
                p,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None,
            )
            .map_err(|e| fail(&what, e))?;
        } else {
            sys.mount(
                Some(Path::new("/dev/null")),
                p,
                None,
                MsFlags::MS_BIND,
                None,
            )
            .map_err(|e| fail(&what, e))?;
        }
    }
    if plan.readonly {
        sys.mount(
            None,
            Path::new("/"),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        )
        .map_err(|e| fail("remount the root read-only", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
