//! Building a microVM from its configuration, and running it to its end.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::api::server::{ApiError, ApiSocket};
use crate::api::{ActionReply, BalloonStatus, OwnerEvent, RunState, VmmAction};
use crate::arch::cpuid::vcpu_cpuid;
use crate::arch::lapic::wire_local_interrupts;
use crate::arch::layout::{KVM_TSS_ADDRESS, SERIAL_IRQ};
use crate::arch::mptable::{self, MpTableError};
use crate::arch::msrs::boot_msrs;
use crate::arch::regs::{boot_fpu, boot_regs, boot_sregs, write_descriptor_tables, EntryPoint};
use crate::boot::{self, BootError, BootSpec, LoadedKernel};
use crate::config::{ConfigError, VmConfig};
use crate::devices::bus::{Bus, BusInsertError};
use crate::devices::console_input::ConsoleInput;
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_PORT};
use crate::devices::i8042::{self, I8042};
use crate::devices::panic_watch::{PanicLine, PanicWatch};
use crate::devices::serial::{SerialPort, COM1_PORT, COM1_PORT_COUNT};
use crate::devices::virtio::balloon::{Balloon, BalloonStats};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::block_media::{Media, MediaSlot};
use crate::devices::virtio::net::{Net, NetError};
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::devices::virtio::VirtioDevice;
use crate::hypervisor::{CpuidEntry, Hypervisor, HypervisorError, Vcpu, Vm};
use crate::kick;
use crate::memory::{self, MemoryError};
use crate::pause::PauseGate;
use crate::seccomp::{ThreadFilters, ThreadKind};
use crate::spawner::{Spawner, SpawnerJobs};
use crate::stop::{GuestStop, StopSignal};
use crate::vcpu_loop::{run_vcpu, VcpuContext};
use crate::virtio_slots::{self, AttachError};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("{requested} vCPUs requested but the hypervisor allows {max}")]
    TooManyVcpus { requested: u8, max: usize },
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error("cannot write the boot page tables and descriptor tables: {0}")]
    BootTables(GuestMemoryError),
    #[error("cannot create the serial interrupt eventfd: {0}")]
    EventFd(io::Error),
    #[error("cannot place a device: {0}")]
    Bus(#[from] BusInsertError),
    #[error(transparent)]
    Disk(#[from] BlockError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("cannot attach virtio devices: {0}")]
    Virtio(#[from] AttachError),
    #[error("vCPU {vcpu}: {source}")]
    Vcpu { vcpu: u8, source: HypervisorError },
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(io::Error),
    #[error("cannot start the thread of vCPU {vcpu}: {source}")]
    Spawn { vcpu: u8, source: io::Error },
    #[error("cannot kick vCPU {vcpu}: {source}")]
    Kick { vcpu: u8, source: io::Error },
    #[error("the thread of vCPU {vcpu} panicked")]
    Panicked { vcpu: u8 },
    #[error("cannot start the console input thread: {0}")]
    ConsoleInput(io::Error),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("cannot start the device workers' spawner thread: {0}")]
    Spawner(io::Error),
    #[error("the device workers' spawner thread panicked")]
    SpawnerPanicked,
}

/// A VM ready to run: memory loaded, devices placed, vCPUs configured.
pub struct MicroVm {
    // Fields drop in this order: vCPUs and devices first, then the VM, then
    // the guest memory the VM maps.
    vcpus: Vec<Box<dyn Vcpu>>,
    io_bus: Bus,
    mmio_bus: Bus,
    stop: Arc<StopSignal>,
    panic_line: PanicLine,
    serial: Arc<Mutex<SerialPort>>,
    console_input: Option<OwnedFd>,
    api: Option<ApiSocket>,
    vm: Arc<dyn Vm>,
    memory: GuestMemoryMmap,
    kernel: LoadedKernel,
    balloon: Option<Arc<BalloonStats>>,
    disks: DiskSlots,
    /// Device workers' thread, started by `run`.
    spawner_jobs: SpawnerJobs,
    filters: ThreadFilters,
}

/// The spare disk slots `attach_disk` fills, after the boot disks.
#[derive(Default)]
struct DiskSlots {
    boot_disks: usize,
    spares: Vec<Arc<MediaSlot>>,
}

impl DiskSlots {
    /// Puts `file` (or `path`, opened here) into the first empty slot; the
    /// guest's disk index.
    fn attach(
        &self,
        path: &std::path::Path,
        read_only: bool,
        file: Option<crate::api::PassedFile>,
    ) -> Result<usize, String> {
        let Some(k) = self.spares.iter().position(|s| s.is_empty()) else {
            return Err(format!(
                "no empty disk slot left ({} spare slots, all filled)",
                self.spares.len()
            ));
        };
        let media = match file {
            Some(file) => file
                .0
                .try_clone()
                .map_err(|e| format!("cannot duplicate the disk's fd: {e}"))
                .and_then(|file| {
                    Media::from_file(file, path, read_only).map_err(|e| e.to_string())
                })?,
            None => Media::open(path, read_only).map_err(|e| e.to_string())?,
        };
        self.spares[k].fill(media).map_err(|e| e.to_string())?;
        Ok(self.boot_disks + k)
    }
}

impl MicroVm {
    /// Creates the VM described by `config`; the serial console writes to
    /// `console`.
    pub fn build(
        hypervisor: &dyn Hypervisor,
        config: &VmConfig,
        console: Box<dyn Write + Send>,
    ) -> Result<MicroVm, BuildError> {
        config.validate()?;
        let max = hypervisor.max_vcpus();
        if usize::from(config.vcpus) > max {
            return Err(BuildError::TooManyVcpus {
                requested: config.vcpus,
                max,
            });
        }

        let vm = hypervisor.create_vm()?;
        vm.set_tss_address(KVM_TSS_ADDRESS)?;
        vm.create_irq_chip()?;
        vm.create_pit()?;

        let memory = memory::allocate(config.memory_bytes(), config.huge_pages)?;
        memory::register(vm.as_ref(), &memory)?;

        let mut mmio_bus = Bus::new();
        let disks = config
            .disks
            .iter()
            .enumerate()
            .map(|(index, disk)| {
                Block::open(&disk.path, disk.read_only, &format!("vmrun-disk-{index}"))
                    .map(|block| Box::new(block) as Box<dyn VirtioDevice>)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut devices = disks;
        let mut disk_slots = DiskSlots {
            boot_disks: devices.len(),
            spares: Vec::new(),
        };
        for k in 0..usize::from(config.spare_disks) {
            let index = disk_slots.boot_disks + k;
            let (block, media) = Block::empty(&format!("vmrun-disk-{index}"));
            devices.push(Box::new(block));
            disk_slots.spares.push(media);
        }
        if let Some(vsock) = &config.vsock {
            devices.push(Box::new(Vsock::new(vsock.guest_cid, &vsock.uds_path)?));
        }
        for net in &config.nets {
            devices.push(Box::new(Net::open(net)?));
        }
        let mut balloon = None;
        if let Some(config) = &config.balloon {
            let device = Balloon::new(config.free_page_reporting);
            balloon = Some(device.stats());
            devices.push(Box::new(device));
        }
        let (spawner, spawner_jobs) = Spawner::pending();
        for device in &mut devices {
            device.set_spawner(&spawner);
        }
        let slots = virtio_slots::attach(vm.as_ref(), &memory, &mut mmio_bus, devices)?;
        let cmdline = std::iter::once(config.cmdline.trim().to_owned())
            .chain(slots.iter().map(|slot| slot.cmdline_parameter()))
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join(" ");

        let kernel = boot::load(
            &memory,
            &BootSpec {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &cmdline,
                memory_size: config.memory_bytes(),
            },
        )?;
        let cr3 = write_descriptor_tables(&memory, kernel.entry).map_err(BuildError::BootTables)?;
        mptable::write(&memory, config.vcpus)?;

        let api = config.api.as_deref().map(ApiSocket::bind).transpose()?;
        let stop = Arc::new(StopSignal::new());
        let panic_line = PanicLine::default();
        let console = Box::new(PanicWatch::new(console, panic_line.clone()));
        let (io_bus, serial) = legacy_devices(vm.as_ref(), &stop, console)?;

        let supported = hypervisor.supported_cpuid()?;
        let vcpus = (0..config.vcpus)
            .map(|id| {
                create_vcpu(vm.as_ref(), id, config.vcpus, &supported, kernel.entry, cr3)
                    .map_err(|source| BuildError::Vcpu { vcpu: id, source })
            })
            .collect::<Result<Vec<_>, _>>()?;

        Ok(MicroVm {
            vcpus,
            io_bus,
            mmio_bus,
            stop,
            panic_line,
            serial,
            console_input: None,
            api,
            vm,
            memory,
            kernel,
            balloon,
            disks: disk_slots,
            spawner_jobs,
            filters: ThreadFilters::none(),
        })
    }

    /// Confines each thread of the running VM to its kind's seccomp
    /// filter (none by default). The thread that calls [`MicroVm::run`]
    /// enters the VMM thread's filter, for good: only a process's main
    /// thread, which exits after, should.
    pub fn set_thread_filters(&mut self, filters: ThreadFilters) {
        self.filters = filters;
    }

    /// The port I/O bus, to add devices before [`MicroVm::run`].
    pub fn io_bus_mut(&mut self) -> &mut Bus {
        &mut self.io_bus
    }

    /// The MMIO bus, to add devices before [`MicroVm::run`].
    pub fn mmio_bus_mut(&mut self) -> &mut Bus {
        &mut self.mmio_bus
    }

    /// Bytes read from `input` go to the guest's serial port while the VM
    /// runs (a thread polls it; it is closed when the VM ends).
    pub fn set_console_input(&mut self, input: OwnedFd) {
        self.console_input = Some(input);
    }

    /// The signal devices use to end the VM.
    pub fn stop_signal(&self) -> Arc<StopSignal> {
        self.stop.clone()
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn vm(&self) -> &Arc<dyn Vm> {
        &self.vm
    }

    pub fn kernel(&self) -> LoadedKernel {
        self.kernel
    }

    /// Runs every vCPU on its own thread until the guest stops; joins them
    /// all before returning why it stopped.
    pub fn run(self) -> Result<GuestStop, RunError> {
        kick::install_handler().map_err(RunError::KickHandler)?;
        let MicroVm {
            vcpus,
            io_bus,
            mmio_bus,
            stop,
            panic_line,
            serial,
            console_input,
            api,
            vm,
            memory,
            kernel: _,
            balloon,
            disks,
            spawner_jobs,
            filters,
        } = self;
        let io_bus = Arc::new(io_bus);
        let mmio_bus = Arc::new(mmio_bus);
        let running = Arc::new(AtomicUsize::new(vcpus.len()));
        let vcpu_count = vcpus.len() as u8;
        // Started first, so failing to start it needs no vCPU stopped.
        // The device workers' spawner first: the vCPUs activate devices.
        let spawner = spawner_jobs
            .serve(filters.clone())
            .map_err(RunError::Spawner)?;
        let input = console_input
            .map(|fd| ConsoleInput::spawn(fd, serial, filters.clone()))
            .transpose()
            .map_err(RunError::ConsoleInput)?;
        // Stops, and control API actions, all reach this thread here.
        let (events_tx, events) = mpsc::channel();
        let notify = events_tx.clone();
        stop.on_request(move || {
            let _ = notify.send(OwnerEvent::Stopped);
        });
        let server = match api
            .map(|socket| socket.serve(events_tx, filters.clone()))
            .transpose()
        {
            Ok(server) => server,
            Err(e) => {
                if let Some(input) = input {
                    input.stop();
                }
                return Err(RunError::Api(e));
            }
        };
        let pause = Arc::new(PauseGate::new());
        let started = Instant::now();

        let mut threads = Vec::with_capacity(vcpus.len());
        let mut spawn_error = None;
        for vcpu in vcpus {
            let id = vcpu.id();
            let context = VcpuContext {
                io_bus: io_bus.clone(),
                mmio_bus: mmio_bus.clone(),
                stop: stop.clone(),
                running: running.clone(),
                pause: pause.clone(),
                filters: filters.clone(),
            };
            let spawned = kick::spawn_with_kick_blocked(|| {
                thread::Builder::new()
                    .name(format!("vcpu{id}"))
                    .spawn(move || run_vcpu(vcpu, context))
            });
            match spawned {
                Ok(handle) => threads.push((id, handle)),
                Err(source) => {
                    // Not all vCPUs can run: stop those already started.
                    stop.request(GuestStop::VcpuFailed {
                        vcpu: id,
                        reason: format!("thread not started: {source}"),
                    });
                    spawn_error = Some(RunError::Spawn { vcpu: id, source });
                    break;
                }
            }
        }

        let mut error = spawn_error;
        let owner = Owner {
            stop: &stop,
            pause: &pause,
            threads: &threads,
            running: &running,
            started,
            vcpus: vcpu_count,
            memory_mib: memory_mib(&memory),
            balloon: balloon.as_deref(),
            disks: &disks,
            opens_paths: !filters.is_active(),
        };
        // Everyone else started: from here the owner only acts and joins.
        filters.enter(ThreadKind::Vmm);
        owner.serve(events);
        let reason = stop.reason().unwrap_or(GuestStop::HostStop);
        // The event receiver is gone, so a request still queued gets its
        // "stopped" answer and the server thread can end.
        if let Some(server) = server {
            server.stop();
        }
        if let Some(input) = input {
            input.stop();
        }
        pause.end();
        for (id, handle) in &threads {
            if let Err(source) = kick::kick(handle) {
                error.get_or_insert(RunError::Kick { vcpu: *id, source });
            }
        }
        for (id, handle) in threads {
            if handle.join().is_err() {
                error.get_or_insert(RunError::Panicked { vcpu: id });
            }
        }
        // The devices hold the spawner's senders: it ends with them.
        drop((io_bus, mmio_bus));
        if spawner.join().is_err() {
            error.get_or_insert(RunError::SpawnerPanicked);
        }
        drop(vm);
        drop(memory);
        match error {
            Some(error) => Err(error),
            None => Ok(reason.after_panic(panic_line.get())),
        }
    }
}

fn memory_mib(memory: &GuestMemoryMmap) -> u64 {
    memory.iter().map(|region| region.len()).sum::<u64>() >> 20
}

/// The thread that owns the running VM: it alone acts on it, for the
/// control API's typed actions, until the VM stops.
struct Owner<'a> {
    stop: &'a StopSignal,
    pause: &'a PauseGate,
    threads: &'a [(u8, JoinHandle<()>)],
    running: &'a AtomicUsize,
    started: Instant,
    vcpus: u8,
    memory_mib: u64,
    balloon: Option<&'a BalloonStats>,
    disks: &'a DiskSlots,
    /// False under seccomp, whose VMM filter has no open: disks must come
    /// as file descriptors.
    opens_paths: bool,
}

/// A `shutdown` waiting for the guest to power off.
struct PendingShutdown {
    deadline: Instant,
    reply: Sender<ActionReply>,
}

impl Owner<'_> {
    /// Handles events until the VM stops.
    fn serve(&self, events: Receiver<OwnerEvent>) {
        let mut shutdown: Option<PendingShutdown> = None;
        loop {
            let event = match &shutdown {
                Some(pending) => {
                    let left = pending.deadline.saturating_duration_since(Instant::now());
                    match events.recv_timeout(left) {
                        Ok(event) => event,
                        Err(RecvTimeoutError::Timeout) => {
                            // The grace period is over: stop it ourselves.
                            self.stop.request(GuestStop::HostStop);
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
                None => match events.recv() {
                    Ok(event) => event,
                    Err(_) => return,
                },
            };
            let request = match event {
                OwnerEvent::Stopped => {
                    if let Some(pending) = shutdown.take() {
                        let outcome = match self.stop.reason() {
                            Some(GuestStop::HostStop) => "forced",
                            _ => "guest stopped",
                        };
                        let _ = pending.reply.send(ActionReply::Done {
                            ok: true,
                            outcome: Some(outcome),
                        });
                    }
                    return;
                }
                OwnerEvent::Action(request) => request,
            };
            let reply = match request.action {
                VmmAction::Shutdown { .. } if shutdown.is_some() => {
                    ActionReply::error("a shutdown is already in progress")
                }
                VmmAction::Shutdown {
                    graceful_timeout_ms,
                } => {
                    shutdown = Some(PendingShutdown {
                        deadline: Instant::now() + Duration::from_millis(graceful_timeout_ms),
                        reply: request.reply,
                    });
                    continue; // answered when the VM stops
                }
                action => self.act(action),
            };
            let _ = request.reply.send(reply);
        }
    }

    fn act(&self, action: VmmAction) -> ActionReply {
        match action {
            VmmAction::Status => ActionReply::Status {
                ok: true,
                state: if self.pause.is_paused() {
                    RunState::Paused
                } else {
                    RunState::Running
                },
                vcpus: self.vcpus,
                memory_mib: self.memory_mib,
                uptime_ms: self.started.elapsed().as_millis() as u64,
                balloon: self.balloon.map(BalloonStatus::from),
            },
            VmmAction::Pause => {
                self.pause.pause();
                for (_, handle) in self.threads {
                    if let Err(e) = kick::kick(handle) {
                        self.pause.resume();
                        return ActionReply::error(format!("cannot kick a vCPU: {e}"));
                    }
                }
                self.pause
                    .wait_parked(|| self.running.load(std::sync::atomic::Ordering::Acquire));
                ActionReply::done()
            }
            VmmAction::Resume => {
                self.pause.resume();
                ActionReply::done()
            }
            VmmAction::Stop => {
                self.stop.request(GuestStop::HostStop);
                ActionReply::done()
            }
            VmmAction::AttachDisk { path, file, .. } if file.is_none() && !self.opens_paths => ActionReply::error(format!(
                "attach_disk {}: this VMM is confined and opens no paths: send the disk's file descriptor with the request (SCM_RIGHTS)",
                path.display()
            )),
            VmmAction::AttachDisk {
                path,
                read_only,
                file,
            } => match self.disks.attach(&path, read_only, file) {
                Ok(disk) => ActionReply::Attached { ok: true, disk },
                Err(e) => ActionReply::error(format!("attach_disk {}: {e}", path.display())),
            },
            VmmAction::TestForbiddenSyscall => {
                ActionReply::error("test_forbidden_syscall is made on the API thread")
            }
            // Needs the event loop's deadline: handled in `serve`.
            VmmAction::Shutdown { .. } => ActionReply::error("shutdown is not handled here"),
        }
    }
}

/// The serial port on IRQ 4 (also returned, for console input), the i8042
/// reset line and the debug-exit port.
fn legacy_devices(
    vm: &dyn Vm,
    stop: &Arc<StopSignal>,
    console: Box<dyn Write + Send>,
) -> Result<(Bus, Arc<Mutex<SerialPort>>), BuildError> {
    let mut bus = Bus::new();
    let interrupt = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&interrupt, SERIAL_IRQ)?;
    let serial = Arc::new(Mutex::new(
        SerialPort::new(interrupt, console).map_err(BuildError::EventFd)?,
    ));
    bus.insert(u64::from(COM1_PORT), COM1_PORT_COUNT, serial.clone())?;
    let i8042 = Arc::new(Mutex::new(I8042::new(stop.clone())));
    bus.insert(u64::from(i8042::DATA_PORT), 1, i8042.clone())?;
    bus.insert(u64::from(i8042::COMMAND_PORT), 1, i8042)?;
    bus.insert(
        u64::from(DEBUG_EXIT_PORT),
        1,
        Arc::new(Mutex::new(DebugExit::new(stop.clone()))),
    )?;
    Ok((bus, serial))
}

/// Creates vCPU `id` of `count` with its CPUID, MSRs and LAPIC wiring; the
/// boot vCPU (0) also gets the entry register state. The others wait in
/// the in-kernel LAPIC for the boot CPU's startup IPI.
fn create_vcpu(
    vm: &dyn Vm,
    id: u8,
    count: u8,
    supported_cpuid: &[CpuidEntry],
    entry: EntryPoint,
    cr3: Option<u64>,
) -> Result<Box<dyn Vcpu>, HypervisorError> {
    let vcpu = vm.create_vcpu(id)?;
    vcpu.set_cpuid(&vcpu_cpuid(supported_cpuid, id, count))?;
    vcpu.set_msrs(&boot_msrs())?;
    vcpu.set_fpu(&boot_fpu())?;
    let lapic = vcpu.get_lapic()?;
    vcpu.set_lapic(&wire_local_interrupts(lapic))?;
    if id == 0 {
        vcpu.set_regs(&boot_regs(entry))?;
        let sregs = vcpu.get_sregs()?;
        vcpu.set_sregs(&boot_sregs(sregs, entry, cr3))?;
    }
    Ok(vcpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shutdown waiting for its grace period is answered "guest stopped"
    /// when the guest powers off first; actions arrive in channel order.
    #[test]
    fn a_pending_shutdown_is_answered_when_the_guest_stops() {
        let stop = StopSignal::new();
        let pause = PauseGate::new();
        let running = AtomicUsize::new(0);
        let owner = Owner {
            stop: &stop,
            pause: &pause,
            threads: &[],
            running: &running,
            started: Instant::now(),
            vcpus: 1,
            memory_mib: 64,
            balloon: None,
            disks: &DiskSlots::default(),
            opens_paths: true,
        };
        let (events_tx, events) = mpsc::channel();
        let notify = events_tx.clone();
        stop.on_request(move || {
            let _ = notify.send(OwnerEvent::Stopped);
        });
        let (reply, answer) = mpsc::channel();
        events_tx
            .send(OwnerEvent::Action(crate::api::ActionRequest {
                action: VmmAction::Shutdown {
                    graceful_timeout_ms: 60_000,
                },
                reply,
            }))
            .unwrap();
        stop.request(GuestStop::PowerOff);
        owner.serve(events);
        assert_eq!(
            answer.recv().unwrap(),
            ActionReply::Done {
                ok: true,
                outcome: Some("guest stopped")
            }
        );
    }

    /// `attach_disk` fills the spare slots in order and names each disk's
    /// guest index; a full set of slots and a bad path are answered as errors.
    #[test]
    fn attach_disk_fills_spare_slots_in_order() {
        let (stop, pause, running) = (StopSignal::new(), PauseGate::new(), AtomicUsize::new(0));
        let disks = DiskSlots {
            boot_disks: 2,
            spares: vec![MediaSlot::empty(), MediaSlot::empty()],
        };
        let owner = Owner {
            stop: &stop,
            pause: &pause,
            threads: &[],
            running: &running,
            started: Instant::now(),
            vcpus: 1,
            memory_mib: 64,
            balloon: None,
            disks: &disks,
            opens_paths: true,
        };
        let image = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(image.path(), [0u8; 4096]).unwrap();
        let attach = |path: &std::path::Path| {
            owner.act(VmmAction::AttachDisk {
                path: path.to_owned(),
                read_only: true,
                file: None,
            })
        };
        assert_eq!(
            attach(image.path()),
            ActionReply::Attached { ok: true, disk: 2 }
        );
        let missing = attach(std::path::Path::new("/nonexistent/disk.img"));
        assert!(
            matches!(&missing, ActionReply::Error { error, .. } if error.contains("/nonexistent/disk.img")),
            "{missing:?}"
        );
        assert_eq!(
            attach(image.path()),
            ActionReply::Attached { ok: true, disk: 3 }
        );
        assert_eq!(disks.spares[1].capacity_sectors(), 8);
        let full = attach(image.path());
        assert!(
            matches!(&full, ActionReply::Error { error, .. } if error.contains("no empty disk slot")),
            "{full:?}"
        );
    }
}
