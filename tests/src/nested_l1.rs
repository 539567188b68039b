//! The level-1 guest of the nested test environment: Debian's cloud kernel (fetched with
//! `apt-get download` and cached with only the modules L1 needs) and a tiny busybox
//! initramfs whose `/init` mounts the host's `/` over virtiofs and runs one command there.
//!
//! Cache layout, under `/var/cache/vmrun/l1` (or `$VMRUN_L1_CACHE`):
//!
//! ```text
//! <kernel version>/vmlinuz
//! <kernel version>/modules/<name>.ko      the wanted modules and their dependencies
//! <kernel version>/modules.order          load order, one module name a line
//! <kernel version>/wanted                 the wanted list these were resolved for
//! <kernel version>/initramfs-<key>.cpio   key = sha256 of busybox, modules and /init
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context};
use sha2::{Digest, Sha256};

use crate::nested::progress;
use crate::nested_cpio::Cpio;

/// The Debian meta package whose dependency names the current cloud kernel.
const META_PACKAGE: &str = "linux-image-cloud-amd64";
const DEFAULT_CACHE: &str = "/var/cache/vmrun/l1";
pub(crate) const BUSYBOX: &str = "/bin/busybox";

/// Modules L1 loads at boot (their dependencies come along): PCI virtio and virtiofs for the
/// host share, KVM with nested SVM, and what tests running inside typically need (vsock
/// for guest agents, overlayfs, tun; veth and bridge for CNI's bridge plugin, and the tc
/// ingress qdisc, u32 classifier and mirred action that join a pod VM's tap to its CNI
/// interface).
const WANTED_MODULES: &[&str] = &[
    "virtio_pci",
    "virtiofs",
    "kvm_amd",
    "vhost_vsock",
    "vsock_loopback",
    "overlay",
    "tun",
    "veth",
    "bridge",
    "sch_ingress",
    "cls_u32",
    "act_mirred",
    // iptables (nf_tables backend) for CNI's portmap plugin: hostPorts.
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nf_nat",
    "nf_conntrack",
    "xt_nat",
    "xt_MASQUERADE",
    "xt_comment",
    "xt_mark",
    "xt_multiport",
    "xt_addrtype",
    "xt_conntrack",
    "xt_tcpudp",
];

/// Parameters L1 loads modules with (none so far; `kvm_amd vgif=0` was tried against the
/// L1 wedge described in docs/vm-runtime.md and did not prevent it).
const MODULE_PARAMS: &[(&str, &str)] = &[];

/// The parameters `name` is loaded with.
fn module_params(name: &str) -> &'static str {
    MODULE_PARAMS
        .iter()
        .find(|(module, _)| *module == name)
        .map_or("", |(_, params)| params)
}

/// The L1 kernel and its modules in the cache.
#[derive(Clone, Debug)]
pub struct L1Kernel {
    pub version: String,
    pub dir: PathBuf,
    pub vmlinuz: PathBuf,
    /// Module files in load order.
    pub modules: Vec<PathBuf>,
}

pub fn cache_root() -> PathBuf {
    std::env::var_os("VMRUN_L1_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE))
}

/// Takes an exclusive `flock` on `path` (created if needed) until the returned guard drops.
pub(crate) fn lock_file(path: &Path) -> anyhow::Result<nix::fcntl::Flock<fs::File>> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {}", path.display()))
}

/// The cached L1 kernel, fetched first if needed.
pub fn kernel() -> anyhow::Result<L1Kernel> {
    let root = cache_root();
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let _lock = lock_file(&root.join(".fetch.lock"))?;
    let version = match resolve_version() {
        Ok(version) => version,
        Err(e) => match newest_cached(&root) {
            Some(version) => {
                progress(&format!(
                    "cannot resolve the current {META_PACKAGE} ({e:#}); using the cached {version}"
                ));
                version
            }
            None => {
                return Err(e.context(format!(
                    "no L1 kernel: cannot resolve {META_PACKAGE} and {} holds none",
                    root.display()
                )))
            }
        },
    };
    let dir = root.join(&version);
    if let Some(kernel) = cached(&dir, &version)? {
        return Ok(kernel);
    }
    fetch(&root, &version)?;
    cached(&dir, &version)?
        .with_context(|| format!("{} is incomplete after fetching", dir.display()))
}

fn wanted_text() -> String {
    WANTED_MODULES.join("\n") + "\n"
}

/// The kernel version (`6.1.0-56-cloud-amd64`) the meta package depends on.
fn resolve_version() -> anyhow::Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", META_PACKAGE])
        .output()
        .context("running apt-cache (is this Debian?)")?;
    ensure!(
        out.status.success(),
        "apt-cache depends {META_PACKAGE} failed (run apt-get update?): {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: linux-image-"))
        .map(str::to_owned)
        .next()
        .with_context(|| {
            format!(
                "apt-cache depends {META_PACKAGE} names no linux-image package:\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
}

fn newest_cached(root: &Path) -> Option<String> {
    let mut versions: Vec<(std::time::SystemTime, String)> = fs::read_dir(root)
        .ok()?
        .flatten()
        .filter(|e| e.path().join("modules.order").is_file())
        .filter_map(|e| {
            let modified = e.metadata().ok()?.modified().ok()?;
            Some((modified, e.file_name().to_str()?.to_owned()))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, version)| version)
}

fn cached(dir: &Path, version: &str) -> anyhow::Result<Option<L1Kernel>> {
    let order = dir.join("modules.order");
    let wanted = fs::read_to_string(dir.join("wanted")).unwrap_or_default();
    if !order.is_file() || wanted != wanted_text() {
        return Ok(None);
    }
    let modules = fs::read_to_string(&order)?
        .lines()
        .filter(|l| !l.is_empty())
        .map(|name| dir.join("modules").join(format!("{name}.ko")))
        .collect::<Vec<_>>();
    let vmlinuz = dir.join("vmlinuz");
    if !vmlinuz.is_file() || modules.iter().any(|m| !m.is_file()) {
        return Ok(None);
    }
    Ok(Some(L1Kernel {
        version: version.to_owned(),
        dir: dir.to_owned(),
        vmlinuz,
        modules,
    }))
}

/// Downloads `linux-image-<version>`, unpacks it and keeps vmlinuz and the module closure.
fn fetch(root: &Path, version: &str) -> anyhow::Result<()> {
    let package = format!("linux-image-{version}");
    progress(&format!(
        "fetching the L1 kernel: apt-get download {package}"
    ));
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(root)
        .context("creating a download directory")?;
    // `_apt` cannot write into a root-owned temp dir: download as root, without the warning.
    let out = Command::new("apt-get")
        .args(["download", "-q", "-o", "APT::Sandbox::User=root", &package])
        .current_dir(work.path())
        .output()
        .context("running apt-get")?;
    ensure!(
        out.status.success(),
        "apt-get download {package} failed (is the Debian archive reachable?):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = fs::read_dir(work.path())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download produced no .deb")?;
    let tree = work.path().join("tree");
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&tree)
        .status()
        .context("running dpkg-deb")?;
    ensure!(status.success(), "dpkg-deb -x {} failed", deb.display());

    let out_dir = work.path().join("out");
    fs::create_dir_all(out_dir.join("modules"))?;
    let vmlinuz = tree.join(format!("boot/vmlinuz-{version}"));
    fs::copy(&vmlinuz, out_dir.join("vmlinuz"))
        .with_context(|| format!("{package} has no {}", vmlinuz.display()))?;
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| tree.join(d).join(version))
        .find(|d| d.is_dir())
        .with_context(|| format!("{package} has no lib/modules/{version}"))?;
    let available = index_modules(&modules_dir)?;
    let order = load_order(&available, WANTED_MODULES)?;
    for name in &order {
        fs::copy(
            &available[name],
            out_dir.join("modules").join(format!("{name}.ko")),
        )?;
    }
    fs::write(out_dir.join("modules.order"), order.join("\n") + "\n")?;
    fs::write(out_dir.join("wanted"), wanted_text())?;

    let dir = root.join(version);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing stale {}", dir.display()))?;
    }
    fs::rename(&out_dir, &dir).with_context(|| format!("moving into {}", dir.display()))?;
    progress(&format!(
        "cached the L1 kernel {version} with {} modules in {}",
        order.len(),
        dir.display()
    ));
    Ok(())
}

/// Module name (`-` written as `_`, as in `depends=`) to file, for every `.ko` below `dir`.
fn index_modules(dir: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                if let Some(stem) = name.strip_suffix(".ko") {
                    found.insert(stem.replace('-', "_"), path.clone());
                } else if name.contains(".ko.") {
                    bail!(
                        "{} is compressed; only uncompressed modules are supported",
                        path.display()
                    );
                }
            }
        }
    }
    Ok(found)
}

/// The `depends=` field of a module's `.modinfo` section.
pub(crate) fn module_depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = module.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &module[at + KEY.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect()
}

/// `wanted` and their dependencies, each after everything it depends on.
fn load_order(
    available: &BTreeMap<String, PathBuf>,
    wanted: &[&str],
) -> anyhow::Result<Vec<String>> {
    fn visit(
        name: &str,
        available: &BTreeMap<String, PathBuf>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> anyhow::Result<()> {
        ensure!(depth < 64, "module dependency cycle at {name}");
        if done.contains(name) {
            return Ok(());
        }
        let path = available
            .get(name)
            .with_context(|| format!("the L1 kernel has no module {name}"))?;
        let bytes = fs::read(path)?;
        for dep in module_depends(&bytes) {
            visit(&dep, available, done, order, depth + 1)?;
        }
        done.insert(name.to_owned());
        order.push(name.to_owned());
        Ok(())
    }
    let mut done = BTreeSet::new();
    let mut order = Vec::new();
    for name in wanted {
        visit(name, available, &mut done, &mut order, 0)?;
    }
    Ok(order)
}

/// L1's `/init`. The kernel command line carries `vmrun.dir=<host path>`: the run directory
/// on the host holding `run.sh` (the command) and `keep-tmp`, and receiving `stdout`,
/// `stderr` and `status`.
const INIT: &str = r#"#!/bin/sh
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/console 2>&1
say() { echo "vmrun-l1: $*"; }
die() { say "FATAL: $*"; sync; poweroff -f; sleep 60; }
say "init started at $(cut -d' ' -f1 /proc/uptime)s"
while read -r module params; do
    insmod "/modules/$module.ko" $params || die "insmod $module $params failed"
done </modules/order
dir=
for arg in $(cat /proc/cmdline); do
    case "$arg" in vmrun.dir=*) dir="${arg#vmrun.dir=}" ;; esac
done
[ -n "$dir" ] || die "no vmrun.dir= on the kernel command line"
mkdir -p /host
mount -t virtiofs host /host || die "cannot mount the host's / (virtiofs tag host)"
[ -d /sys/module/kvm_amd ] || die "kvm_amd is not loaded"
[ ! -e /sys/module/kvm_pvm ] || die "kvm_pvm is loaded in L1"
[ -c /dev/kvm ] || die "/dev/kvm is missing"
ip link set lo up || die "cannot bring up lo"
# Fresh /tmp and /run: the host's stay untouched. Paths listed in keep-tmp (relative to
# /tmp) stay visible from the host.
mkdir -p /mnt/host-tmp
mount --bind /host/tmp /mnt/host-tmp || die "cannot bind the host's /tmp"
mount -t tmpfs -o mode=1777 tmpfs /host/tmp || die "cannot mount /tmp"
while read -r keep; do
    [ -n "$keep" ] || continue
    if [ -d "/mnt/host-tmp/$keep" ]; then
        mkdir -p "/host/tmp/$keep"
    else
        mkdir -p "$(dirname "/host/tmp/$keep")" && touch "/host/tmp/$keep"
    fi
    mount --bind "/mnt/host-tmp/$keep" "/host/tmp/$keep" || die "cannot keep /tmp/$keep"
done <"/host$dir/keep-tmp"
mount -t tmpfs -o mode=755 tmpfs /host/run || die "cannot mount /run"
mount -t proc proc /host/proc || die "cannot mount /proc"
mount -t sysfs sysfs /host/sys || die "cannot mount /sys"
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup || die "cannot mount cgroup2"
mount -t devtmpfs devtmpfs /host/dev || die "cannot mount /dev"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts || die "cannot mount /dev/pts"
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm || die "cannot mount /dev/shm"
# A heartbeat for the host, which takes a silent L1 for wedged (QEMU's nested
# SVM now and then stops delivering L1's interrupts) rather than waiting for
# the whole run's timeout.
( while :; do touch "/host$dir/heartbeat"; sleep 5; done ) &
say "command started at $(cut -d' ' -f1 /proc/uptime)s"
chroot /host /bin/sh "$dir/run.sh" </dev/null >"/host$dir/stdout" 2>"/host$dir/stderr"
status=$?
say "command exited with $status at $(cut -d' ' -f1 /proc/uptime)s"
echo "$status" >"/host$dir/status.tmp" && mv "/host$dir/status.tmp" "/host$dir/status"
sync
poweroff -f
"#;

/// The L1 initramfs for `kernel`, built once per distinct input and cached.
pub fn initramfs(kernel: &L1Kernel) -> anyhow::Result<PathBuf> {
    let busybox = static_busybox()?;
    let mut modules = Vec::new();
    for path in &kernel.modules {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .context("module file name")?
            .to_owned();
        modules.push((name, fs::read(path)?));
    }
    let mut hash = Sha256::new();
    hash.update(INIT.as_bytes());
    hash.update(&busybox);
    for (name, bytes) in &modules {
        hash.update(name.as_bytes());
        hash.update(module_params(name).as_bytes());
        hash.update(bytes);
    }
    let key = &hex::encode(hash.finalize())[..16];
    let path = kernel.dir.join(format!("initramfs-{key}.cpio"));
    if path.is_file() {
        return Ok(path);
    }

    let mut cpio = Cpio::new();
    for dir in [
        "/bin", "/dev", "/proc", "/sys", "/host", "/mnt", "/tmp", "/modules",
    ] {
        cpio.dir(dir);
    }
    cpio.char_device("/dev/console", 0o600, 5, 1)
        .file("/bin/busybox", 0o755, &busybox)
        .symlink("/bin/sh", "busybox")
        .file("/init", 0o755, INIT.as_bytes());
    let mut order = String::new();
    for (name, bytes) in &modules {
        cpio.file(&format!("/modules/{name}.ko"), 0o644, bytes);
        order.push_str(&format!("{name} {}\n", module_params(name)));
    }
    cpio.file("/modules/order", 0o644, order.as_bytes());
    let mut tmp = tempfile::NamedTempFile::new_in(&kernel.dir)?;
    tmp.write_all(&cpio.finish())?;
    tmp.persist(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The bytes of a statically linked busybox (Debian's `busybox-static`).
pub fn static_busybox() -> anyhow::Result<Vec<u8>> {
    let bytes = fs::read(BUSYBOX)
        .with_context(|| format!("{BUSYBOX} is missing (apt-get install busybox-static)"))?;
    ensure!(
        is_static_elf(&bytes),
        "{BUSYBOX} is dynamically linked; the initramfs needs busybox-static (apt-get install busybox-static)"
    );
    Ok(bytes)
}

/// An ELF64 little-endian executable without a `PT_INTERP` program header.
fn is_static_elf(bytes: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |at: usize| {
        bytes
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if bytes.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff as usize + i * usize::from(phentsize);
        bytes
            .get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) != PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_field_is_read_from_modinfo() {
        let module = b"\x7fELF...\0license=GPL\0depends=fuse,virtio_ring,kvm-x\0intree=Y\0";
        assert_eq!(module_depends(module), ["fuse", "virtio_ring", "kvm_x"]);
        assert!(module_depends(b"\0depends=\0name=x\0").is_empty());
        assert!(module_depends(b"no modinfo").is_empty());
    }

    #[test]
    fn busybox_static_is_recognised() {
        let busybox = fs::read(BUSYBOX).expect("busybox-static is installed");
        assert!(
            is_static_elf(&busybox),
            "{BUSYBOX} should be busybox-static"
        );
        let dynamic = fs::read("/bin/true").unwrap();
        assert!(!is_static_elf(&dynamic));
    }
}
