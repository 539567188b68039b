//! `vmrun-vmm`: boots one microVM and exits with the guest's outcome.
//!
//! Exit status: 0 when the guest powers off or asks for a reset, the
//! guest's own status when it writes the debug-exit port, 1 when the guest
//! crashes or the VMM fails, 2 for a bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use vmrun_vmm::config::{
    ConfigError, ConsoleConfig, DiskConfig, VmConfig, DEFAULT_CMDLINE, DEFAULT_MEMORY_MIB,
    DEFAULT_VCPUS,
};
use vmrun_vmm::devices::serial::console_writer;
use vmrun_vmm::hypervisor::kvm::{HostKvm, KvmHypervisor};
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
    /// Serial console: stdio, off, or a file path.
    #[arg(long, default_value = "stdio")]
    console: ConsoleConfig,
    /// A disk image as a virtio-blk device: PATH or PATH,ro (repeatable).
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<DiskConfig>,
    /// A JSON VM configuration instead of the options above.
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "disks"])]
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
        console: args.console,
        disks: args.disks,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
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
    match run(&config) {
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
fn run(config: &VmConfig) -> anyhow::Result<u8> {
    if HostKvm::detect() == HostKvm::Pvm {
        eprintln!(
            "vmrun-vmm: host KVM is kvm_pvm (no hardware virtualization): only a PVM-enabled guest kernel boots here"
        );
    }
    let hypervisor = KvmHypervisor::new()?;
    let console = console_writer(&config.console)
        .with_context(|| format!("cannot open the console {:?}", config.console))?;
    let vm = MicroVm::build(&hypervisor, config, console)?;
    let stop = vm.run()?;
    if !stop.is_clean() {
        eprintln!("vmrun-vmm: {stop}");
    }
    Ok(stop.exit_code().clamp(0, 255) as u8)
}
