//! `vmrun-vmm`: boots one microVM and exits with the guest's outcome.
//!
//! Exit status: 0 when the guest powers off or asks for a reset (our
//! guests stop with `reboot=k`), the guest's own status when it writes the
//! debug-exit port, 1 when the guest crashes (triple fault, a kernel panic
//! line before the reset, a hypervisor error) or the VMM fails, 2 for a
//! bad configuration.

use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use vmrun_vmm::config::{
    BalloonConfig, ConfigError, ConsoleConfig, DiskConfig, NetConfig, VmConfig, VsockConfig,
    DEFAULT_CMDLINE, DEFAULT_MEMORY_MIB, DEFAULT_VCPUS,
};
use vmrun_vmm::devices::console_input::RawTerminal;
use vmrun_vmm::devices::serial::console_writer;
use vmrun_vmm::hypervisor::kvm::{HostKvm, KvmHypervisor};
use vmrun_vmm::jail::{self, JailConfig};
use vmrun_vmm::seccomp::ThreadFilters;
use vmrun_vmm::vm::{BuildError, MicroVm};

#[derive(Parser, Debug)]
#[command(
    name = "vmrun-vmm",
    version,
    about = "Boot a Linux kernel in a KVM microVM"
)]
struct Args {
    /// Guest kernel: an ELF vmlinux (PVH entry) or a bzImage.
    #[arg(long, required_unless_present = "config")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (initramfs).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs (1 to 32).
    #[arg(long, default_value_t = DEFAULT_VCPUS)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB)]
    memory: u64,
    /// Back guest memory with transparent huge pages (default: never, which
    /// keeps the host memory of a guest to the 4 KiB pages it touched).
    #[arg(long)]
    huge_pages: bool,
    /// Serial console: stdio, off, or a file path.
    #[arg(long, default_value = "stdio")]
    console: ConsoleConfig,
    /// A disk image as a virtio-blk device: PATH or PATH,ro (repeatable).
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<DiskConfig>,
    /// Empty disk slots after the --disk ones (the guest sees them as
    /// disks of size 0), each filled once while the guest runs by the
    /// control API's {"action":"attach_disk","path":P,"read_only":B}.
    #[arg(long, default_value_t = 0)]
    spare_disks: u8,
    /// A hybrid vsock device: host clients connect to the unix socket PATH
    /// and write `CONNECT <port>\n`; guest connects to host port P reach
    /// `PATH_P`. The guest CID defaults to 3.
    #[arg(long, value_name = "PATH[,cid=N]")]
    vsock: Option<VsockConfig>,
    /// A virtio-net device on a tap device (repeatable): TAPNAME (created,
    /// or attached if it exists: needs CAP_NET_ADMIN or a tap owned by
    /// this user) or fd=N (an inherited open tap), optionally with
    /// ,mac=52:54:00:xx:xx:xx (default: derived from the tap's name).
    #[arg(long = "net", value_name = "TAPNAME|fd=N[,mac=MAC]")]
    nets: Vec<NetConfig>,
    /// A control socket: line-delimited JSON requests such as
    /// {"action":"status"}, pause, resume, stop, and
    /// {"action":"shutdown","graceful_timeout_ms":N}.
    #[arg(long, value_name = "PATH")]
    api: Option<PathBuf>,
    /// Add a virtio-balloon device with free page reporting: the guest
    /// hands memory it freed back to the host (needs a guest kernel with
    /// CONFIG_VIRTIO_BALLOON; the balloon itself is never inflated).
    #[arg(long)]
    free_page_reporting: bool,
    /// Jail the VMM once the VM is built (needs root): DIR becomes its
    /// working directory at once (give socket and console paths relative
    /// to it) and, before the VM runs, the root of a mount namespace of its
    /// own, read-only; every capability goes, no_new_privs is set.
    #[arg(long, value_name = "DIR")]
    jail: Option<PathBuf>,
    /// With --jail: the uid to run as once jailed (e.g. 65534).
    #[arg(long, requires = "jail")]
    jail_uid: Option<u32>,
    /// With --jail: the gid to run as once jailed.
    #[arg(long, requires = "jail")]
    jail_gid: Option<u32>,
    /// Each thread's seccomp filter (on by default): off runs unconfined,
    /// for debugging only.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    seccomp: String,
    /// A JSON VM configuration instead of the options above.
    #[arg(
        long,
        conflicts_with_all = ["kernel", "initrd", "disks", "spare_disks", "vsock", "nets", "api", "free_page_reporting", "huge_pages"]
    )]
    config: Option<PathBuf>,
}

const EXIT_BAD_CONFIG: u8 = 2;

fn config_from(args: Args) -> anyhow::Result<VmConfig> {
    if let Some(path) = args.config {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        return serde_json::from_str(&text)
            .with_context(|| format!("invalid config {}", path.display()));
    }
    Ok(VmConfig {
        kernel: args.kernel.context("--kernel is required")?,
        initrd: args.initrd,
        cmdline: args.cmdline,
        vcpus: args.vcpus,
        memory_mib: args.memory,
        huge_pages: args.huge_pages,
        console: args.console,
        disks: args.disks,
        spare_disks: args.spare_disks,
        vsock: args.vsock,
        nets: args.nets,
        api: args.api,
        balloon: args.free_page_reporting.then_some(BalloonConfig {
            free_page_reporting: true,
        }),
    })
}

/// How the running VMM is confined.
struct Confinement {
    jail: Option<JailConfig>,
    seccomp: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let confinement = Confinement {
        jail: args.jail.clone().map(|root| JailConfig {
            root,
            uid: args.jail_uid,
            gid: args.jail_gid,
        }),
        seccomp: args.seccomp == "on",
    };
    if let Some(jail) = &confinement.jail {
        // Relative paths (sockets, console) are the jail's from here on.
        if let Err(e) = std::env::set_current_dir(&jail.root) {
            eprintln!("vmrun-vmm: jail directory {}: {e}", jail.root.display());
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    }
    let config = match config_from(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("vmrun-vmm: {e:#}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if let Err(e) = config.validate() {
        eprintln!("vmrun-vmm: invalid configuration: {e}");
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    match run(&config, &confinement) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vmrun-vmm: {e:#}");
            let config_error = e
                .downcast_ref::<BuildError>()
                .is_some_and(|e| matches!(e, BuildError::Config(_)))
                || e.downcast_ref::<ConfigError>().is_some();
            ExitCode::from(if config_error { EXIT_BAD_CONFIG } else { 1 })
        }
    }
}

/// Boots the VM; returns the exit status for the guest's outcome.
fn run(config: &VmConfig, confinement: &Confinement) -> anyhow::Result<u8> {
    if HostKvm::detect() == HostKvm::Pvm {
        eprintln!(
            "vmrun-vmm: note: host KVM is kvm_pvm (no hardware virtualization): stock kernels do not boot at usable speed here, a PVM-enabled guest kernel is needed"
        );
    }
    let hypervisor = KvmHypervisor::new()?;
    let console = console_writer(&config.console)
        .with_context(|| format!("cannot open the console {:?}", config.console))?;
    let mut vm = MicroVm::build(&hypervisor, config, console)?;
    // With the console on stdio, stdin is the guest's keyboard; a terminal
    // goes raw (the guest echoes and edits lines) until the VM ends.
    let _raw_terminal = if config.console == ConsoleConfig::Stdio {
        let stdin = std::io::stdin();
        vm.set_console_input(
            stdin
                .as_fd()
                .try_clone_to_owned()
                .context("cannot duplicate stdin")?,
        );
        RawTerminal::enable_if_tty(stdin.as_raw_fd()).context("cannot make the terminal raw")?
    } else {
        None
    };
    // Everything the VM needs is open; no thread runs yet.
    if let Some(jail) = &confinement.jail {
        jail::enter(jail)?;
    }
    if confinement.seccomp {
        vm.set_thread_filters(ThreadFilters::compile()?);
    }
    let stop = vm.run()?;
    if !stop.is_clean() {
        eprintln!("vmrun-vmm: {stop}");
    }
    Ok(stop.exit_code().clamp(0, 255) as u8)
}
