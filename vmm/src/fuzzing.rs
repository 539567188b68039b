//! Fuzzing harnesses for what a guest controls: the virtio devices' queue
//! processing and the virtio-mmio registers.
//!
//! Shared by the libFuzzer targets in `fuzz/` and by the regression test
//! (`vmm/tests/fuzz_regressions.rs`) that replays the kept inputs and seeds,
//! so both run exactly the same code. Not an API: hidden from the docs.
//!
//! Each harness plays a hostile guest driver. The input is a script: a few
//! bytes set up each queue (size, and where its descriptor table, avail
//! ring and used ring lie — anywhere in guest memory, overlapping each
//! other or the buffers, or partly outside it), then operations: write a
//! descriptor (any address, length, flags and `next`: loops, out-of-table
//! indices, buffers over the rings), put a head (any value) in the avail
//! ring, set the avail index to anything, patch guest memory, notify a
//! queue, and device-specific ones (a frame or stream data arriving from
//! the host side). The rings are written the way a driver lays them out
//! in guest memory (virtio 1.2 section 2.7, split virtqueues), so the
//! device reads them through `virtio-queue` exactly as from a guest.
//!
//! A device may refuse a chain or fail (needing a reset); it must not
//! panic, hang or allocate without bound. The few invariants checked here
//! beyond that are asserted, so a violation is a crash too.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::chain::{ETH_HLEN, MAX_FRAME};
use crate::devices::virtio::net::tap::NetBackend;
use crate::devices::virtio::net::NetStats;
use crate::devices::virtio::vsock::muxer::Muxer;
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};

/// Guest memory: two regions with a one-page hole between them and
/// nothing after 0x11000, so chains can cross a region boundary, land in
/// the hole or run off the end.
const REGIONS: [(u64, usize); 2] = [(0, 0x8000), (0x9000, 0x8000)];
/// Operations per input: enough for long scripts, few enough that one
/// input stays fast.
const MAX_OPS: usize = 256;
/// The disk the block harnesses serve: 16 sectors.
const DISK_SECTORS: usize = 16;

/// The fuzz input, read front to back; past its end every read gives 0.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let got = self.bytes(N);
        out[..got.len()].copy_from_slice(got);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

fn guest_memory() -> GuestMemoryMmap {
    let regions: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(start, len)| (GuestAddress(start), len))
        .collect();
    GuestMemoryMmap::from_ranges(&regions).expect("guest memory")
}

/// An address for a ring or table: anywhere from 0 to 0x1fffe, so inside
/// either region, in the hole, or past the end.
fn ring_address(input: &mut Input, align: u64) -> u64 {
    (u64::from(input.u16()) * 2) & !(align - 1)
}

/// The driver's side of one split virtqueue.
struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
}

/// The guest driver: guest memory and where it put each queue.
struct Driver {
    memory: GuestMemoryMmap,
    queues: Vec<DriverQueue>,
}

impl Driver {
    fn new(memory: GuestMemoryMmap) -> Self {
        Driver {
            memory,
            queues: Vec::new(),
        }
    }

    /// Sets up a queue of at most `max_size` entries where the input says;
    /// returns the device's view of it. Whether it is valid is for the
    /// device's activation to check.
    fn add_queue(&mut self, input: &mut Input, max_size: u16) -> Queue {
        let exponents = max_size.trailing_zeros() + 1;
        let size = 1u16 << (u32::from(input.u8()) % exponents);
        let desc = ring_address(input, 16);
        let avail = ring_address(input, 2);
        let used = ring_address(input, 4);
        let event_idx = input.u8() & 1 != 0;
        let mut queue = Queue::new(max_size).expect("a power-of-two queue size");
        queue.set_size(size);
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        self.queues.push(DriverQueue {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
        });
        queue
    }

    /// The used indices of all queues added up: how many chains the device
    /// returned (if the guest did not overwrite the indices since).
    fn used_entries(&self) -> u64 {
        self.queues
            .iter()
            .filter_map(|q| self.memory.read_obj::<u16>(GuestAddress(q.used + 2)).ok())
            .map(|idx| u64::from(u16::from_le(idx)))
            .sum()
    }

    fn pick_queue(&self, input: &mut Input) -> usize {
        usize::from(input.u8()) % self.queues.len().max(1)
    }

    /// A write the guest does; one outside its memory simply does not happen.
    fn write(&self, bytes: &[u8], addr: u64) {
        let _ = self.memory.write_slice(bytes, GuestAddress(addr));
    }

    /// Runs one of the driver operations (`op` 0 to 3).
    fn op(&mut self, op: u8, input: &mut Input) {
        if self.queues.is_empty() {
            return;
        }
        let index = self.pick_queue(input);
        match op {
            // A descriptor: 64-bit address (the high half picked from a few
            // values so that overflowing ones come up), length, flags, next.
            0 => {
                let queue = &self.queues[index];
                let slot = u64::from(input.u16() % queue.size);
                let high = match input.u8() % 4 {
                    0 | 1 => 0,
                    2 => 0xffff_ffff,
                    _ => u64::from(input.u32()),
                };
                let addr = (high << 32) | u64::from(input.u32());
                let len = input.u32();
                let flags = input.u16();
                let next = input.u16();
                let mut raw = [0u8; 16];
                raw[..8].copy_from_slice(&addr.to_le_bytes());
                raw[8..12].copy_from_slice(&len.to_le_bytes());
                raw[12..14].copy_from_slice(&flags.to_le_bytes());
                raw[14..].copy_from_slice(&next.to_le_bytes());
                self.write(&raw, queue.desc + slot * 16);
            }
            // A head (any value, also past the table) made available.
            1 => {
                let head = input.u16();
                let queue = &mut self.queues[index];
                let slot = u64::from(queue.avail_idx % queue.size);
                let (avail, idx) = (queue.avail, queue.avail_idx.wrapping_add(1));
                queue.avail_idx = idx;
                self.write(&head.to_le_bytes(), avail + 4 + slot * 2);
                self.write(&idx.to_le_bytes(), avail + 2);
            }
            // The avail index set to anything (more than the queue holds).
            2 => {
                let idx = input.u16();
                let queue = &mut self.queues[index];
                queue.avail_idx = idx;
                let avail = queue.avail;
                self.write(&idx.to_le_bytes(), avail + 2);
            }
            // Any bytes anywhere (the rings' flags and event fields too).
            _ => {
                let addr = u64::from(input.u16()) * 2;
                let len = usize::from(input.u8());
                let bytes = input.bytes(len);
                self.write(bytes, addr);
            }
        }
    }
}

fn interrupt() -> (Arc<VirtioInterrupt>, EventFd) {
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().expect("eventfd")));
    (interrupt, irq)
}

/// Fills `disk` with [`DISK_SECTORS`] sectors, sector n holding byte n,
/// so that every input starts from the same disk.
fn reset_disk(disk: &Path) {
    let mut image = vec![0u8; DISK_SECTORS * 512];
    for (n, sector) in image.chunks_mut(512).enumerate() {
        sector.fill(n as u8);
    }
    std::fs::write(disk, image).expect("disk image");
}

/// Runs the script's operations: driver ones (0-3), notify (4) and
/// `device_op` for the rest, which gets the op number and the input.
fn run_script(
    driver: &mut Driver,
    input: &mut Input,
    mut notify: impl FnMut(&Driver, usize),
    mut device_op: impl FnMut(&mut Driver, u8, &mut Input),
) {
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 8 {
            op @ 0..=3 => driver.op(op, input),
            4 => {
                let queue = driver.pick_queue(input);
                notify(driver, queue);
            }
            op => device_op(driver, op, input),
        }
    }
}

/// Each harness returns how much the device did for the guest: chains
/// returned to it (or, for the transport, interrupts raised), which the
/// regression test checks its seeds get.
///
/// virtio-blk: a 16-sector disk (read-only, read-write, or an empty slot
/// filled partway through) and its request queue.
pub fn block_queue(data: &[u8], disk: &Path) -> u64 {
    let mut input = Input::new(data);
    reset_disk(disk);
    let mode = input.u8();
    let read_only = mode & 1 != 0;
    let (mut block, slot) = if mode & 2 != 0 {
        let (block, slot) = Block::empty("fuzz-slot");
        (block, Some(slot))
    } else {
        let block = Block::open(disk, read_only, "fuzz-disk").expect("open the disk");
        (block, None)
    };
    block.ack_features(input.u64());
    let mut driver = Driver::new(guest_memory());
    let queue = driver.add_queue(&mut input, block.queue_max_sizes()[0]);
    let (interrupt, _irq) = interrupt();
    if block
        .activate(driver.memory.clone(), vec![queue], interrupt)
        .is_err()
    {
        return 0;
    }
    let block = std::cell::RefCell::new(block);
    run_script(
        &mut driver,
        &mut input,
        |_, _| {
            // An error is the device asking for a reset, as the transport
            // reports it; the guest may notify again all the same.
            let _ = block.borrow_mut().process_queue(0);
        },
        |_, _, _| {
            if let Some(slot) = &slot {
                // The host attaches the disk while the guest runs.
                use crate::devices::virtio::block_media::Media;
                if slot.is_empty() {
                    let media = Media::open(disk, read_only).expect("open the disk");
                    slot.fill(media).expect("fill an empty slot");
                }
            }
        },
    );
    driver.used_entries()
}

/// virtio-balloon: the inflate and deflate queues and, when negotiated,
/// the free page reporting queue (whose ranges are `madvise`d away).
pub fn balloon_queues(data: &[u8]) -> u64 {
    let mut input = Input::new(data);
    let mut balloon = Balloon::new(input.u8() & 1 != 0);
    balloon.ack_features(input.u64());
    let mut driver = Driver::new(guest_memory());
    let max = balloon.queue_max_sizes()[0];
    let queues: Vec<Queue> = (0..balloon.queues_in_use())
        .map(|_| driver.add_queue(&mut input, max))
        .collect();
    let (interrupt, _irq) = interrupt();
    if balloon
        .activate(driver.memory.clone(), queues, interrupt)
        .is_err()
    {
        return 0;
    }
    let balloon = std::cell::RefCell::new(balloon);
    run_script(
        &mut driver,
        &mut input,
        |_, queue| {
            let _ = balloon.borrow_mut().process_queue(queue as u16);
        },
        |_, op, input| {
            // The driver writes `actual` (or anything else) in the config space.
            let mut balloon = balloon.borrow_mut();
            let _ = op;
            let offset = u64::from(input.u8() % 24);
            let len = usize::from(input.u8() % 9);
            balloon.write_config(offset, input.bytes(len));
        },
    );
    driver.used_entries()
}

/// What the net harness's backend is told to answer next.
#[derive(Clone, Copy)]
enum SendResult {
    Ok,
    WouldBlock,
    Interrupted,
    Fail,
}

/// A [`NetBackend`] the input drives: frames arriving from the host side,
/// and how the next sends go. Checks that every frame the device sends
/// is a whole Ethernet frame of at most [`MAX_FRAME`] bytes.
struct ScriptedBackend {
    /// Only for the trait's fd; never waited on here.
    fd: EventFd,
    state: Arc<Mutex<BackendState>>,
}

#[derive(Default)]
struct BackendState {
    rx_frames: VecDeque<Vec<u8>>,
    rx_closed: bool,
    send_results: VecDeque<SendResult>,
}

impl AsRawFd for ScriptedBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl NetBackend for ScriptedBackend {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        assert!(
            (ETH_HLEN..=MAX_FRAME).contains(&frame.len()),
            "the device sent a {}-byte frame",
            frame.len()
        );
        let result = self.state.lock().unwrap().send_results.pop_front();
        match result.unwrap_or(SendResult::Ok) {
            SendResult::Ok => Ok(()),
            SendResult::WouldBlock => Err(io::ErrorKind::WouldBlock.into()),
            SendResult::Interrupted => Err(io::ErrorKind::Interrupted.into()),
            SendResult::Fail => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut state = self.state.lock().unwrap();
        match state.rx_frames.pop_front() {
            // A datagram longer than the buffer is cut, as recv(2) does.
            Some(frame) => {
                let n = frame.len().min(buf.len());
                buf[..n].copy_from_slice(&frame[..n]);
                Ok(n)
            }
            None if state.rx_closed => Ok(0),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// virtio-net: the rx and tx queues served by the device worker's
/// `process_rx`/`process_tx`, called here on this thread, with a backend
/// the input scripts.
pub fn net_queues(data: &[u8]) -> u64 {
    use crate::devices::virtio::net::worker::Worker;
    use crate::devices::virtio::net::{QUEUE_SIZE, RX_QUEUE, TX_QUEUE};

    let mut input = Input::new(data);
    let mut driver = Driver::new(guest_memory());
    let queues = vec![
        driver.add_queue(&mut input, QUEUE_SIZE),
        driver.add_queue(&mut input, QUEUE_SIZE),
    ];
    if queues.iter().any(|q| !q.is_valid(&driver.memory)) {
        return 0; // activation refuses it (`check_queues`)
    }
    let state = Arc::new(Mutex::new(BackendState::default()));
    let backend = ScriptedBackend {
        fd: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        state: state.clone(),
    };
    let (interrupt, _irq) = interrupt();
    let stats = Arc::new(NetStats::default());
    let worker = Worker::new(
        driver.memory.clone(),
        queues,
        interrupt,
        Box::new(backend),
        stats,
    );
    let worker = std::cell::RefCell::new(worker);
    let failed = AtomicBool::new(false);
    run_script(
        &mut driver,
        &mut input,
        |_, queue| {
            // A worker error stops the device thread: nothing more is served.
            if failed.load(Ordering::Relaxed) {
                return;
            }
            let mut worker = worker.borrow_mut();
            let result = match queue {
                RX_QUEUE => worker.process_rx(),
                TX_QUEUE => worker.process_tx(),
                _ => Ok(()),
            };
            if result.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
        },
        |_, op, input| match op {
            // A frame from the host side: up to 64 KiB + 512, so longer
            // than the largest frame too; the content from the input,
            // repeated.
            5 => {
                let len = usize::from(input.u16()) + usize::from(input.u8() % 2) * 512;
                let pattern = input.bytes(16);
                let frame: Vec<u8> = if pattern.is_empty() {
                    vec![0; len]
                } else {
                    pattern.iter().copied().cycle().take(len).collect()
                };
                state.lock().unwrap().rx_frames.push_back(frame);
            }
            // How the next sends go.
            6 => {
                let result = match input.u8() % 4 {
                    0 => SendResult::Ok,
                    1 => SendResult::WouldBlock,
                    2 => SendResult::Interrupted,
                    _ => SendResult::Fail,
                };
                state.lock().unwrap().send_results.push_back(result);
            }
            // The backend's fd became ready, or the backend went away.
            _ => {
                let events = input.u32();
                if events == u32::MAX {
                    state.lock().unwrap().rx_closed = true;
                }
                worker.borrow_mut().on_backend_event(events);
            }
        },
    );
    driver.used_entries()
}

/// virtio-vsock: rx, tx and event queues served by the device worker's
/// `process_rx`/`process_tx` on this thread, the muxer on a socket in
/// `dir`, a host listener on its port 1024 (`<uds>_1024`) for streams the
/// guest opens, and host clients that connect and write what the input
/// says. Only unix sockets in `dir`.
pub fn vsock_queues(data: &[u8], dir: &Path) -> u64 {
    use crate::devices::virtio::vsock::worker::Worker;
    use crate::devices::virtio::vsock::{QUEUE_SIZE, RX_QUEUE, TX_QUEUE};

    let mut input = Input::new(data);
    let mut driver = Driver::new(guest_memory());
    let queues: Vec<Queue> = (0..3)
        .map(|_| driver.add_queue(&mut input, QUEUE_SIZE))
        .collect();
    if queues.iter().any(|q| !q.is_valid(&driver.memory)) {
        return 0; // activation refuses it (`check_queues`)
    }
    let uds = dir.join("vsock");
    let muxer = Muxer::new(3, &uds).expect("vsock muxer");
    let mut listener_path = uds.clone().into_os_string();
    listener_path.push("_1024");
    let _ = std::fs::remove_file(&listener_path);
    let listener = UnixListener::bind(&listener_path).expect("host listener");
    listener.set_nonblocking(true).expect("non-blocking");
    let (interrupt, _irq) = interrupt();
    let worker =
        std::cell::RefCell::new(Worker::new(driver.memory.clone(), queues, interrupt, muxer));
    let failed = AtomicBool::new(false);
    // Host ends of streams: clients of the muxer and accepted guest connects.
    let mut host: Vec<UnixStream> = Vec::new();
    run_script(
        &mut driver,
        &mut input,
        |_, queue| {
            if failed.load(Ordering::Relaxed) {
                return;
            }
            let mut worker = worker.borrow_mut();
            let result = match queue {
                TX_QUEUE => worker.process_tx().and_then(|()| worker.process_rx()),
                RX_QUEUE => worker.process_rx(),
                _ => Ok(()),
            };
            if result.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
        },
        |_, op, input| {
            match op {
                // A host client connects and writes (a CONNECT line, or not).
                5 => {
                    if host.len() < 16 {
                        if let Ok(stream) = UnixStream::connect(&uds) {
                            let _ = stream.set_nonblocking(true);
                            host.push(stream);
                        }
                    }
                    if let Ok((stream, _)) = listener.accept() {
                        let _ = stream.set_nonblocking(true);
                        host.push(stream);
                    }
                }
                // A host end writes, reads, or closes.
                6 if !host.is_empty() => {
                    let index = usize::from(input.u8()) % host.len();
                    match input.u8() % 4 {
                        0 => {
                            let port = input.u16() % 2048;
                            let line = format!("CONNECT {port}\n");
                            let _ = io::Write::write(&mut &host[index], line.as_bytes());
                        }
                        1 => {
                            let len = usize::from(input.u8());
                            let bytes = input.bytes(len);
                            let _ = io::Write::write(&mut &host[index], bytes);
                        }
                        2 => {
                            let mut buf = [0u8; 4096];
                            let _ = io::Read::read(&mut &host[index], &mut buf);
                        }
                        _ => {
                            let _ = host[index].shutdown(std::net::Shutdown::Both);
                            host.swap_remove(index);
                        }
                    }
                }
                _ => {}
            }
            worker.borrow_mut().muxer.process_host_events();
            if !failed.load(Ordering::Relaxed) && worker.borrow_mut().process_rx().is_err() {
                failed.store(true, Ordering::Relaxed);
            }
        },
    );
    drop(host);
    drop(worker);
    let _ = std::fs::remove_file(&listener_path);
    driver.used_entries()
}

/// The virtio-mmio transport: register and configuration-space accesses
/// of any offset, width and value, with a virtio-blk or virtio-balloon
/// device behind it, and guest memory patched in between, so a driver
/// that sets its queues up right gets requests served.
pub fn mmio_accesses(data: &[u8], disk: &Path) -> u64 {
    let mut input = Input::new(data);
    let device: Box<dyn VirtioDevice> = match input.u8() % 3 {
        0 => {
            reset_disk(disk);
            Box::new(Block::open(disk, false, "fuzz-disk").expect("open the disk"))
        }
        1 => Box::new(Balloon::new(false)),
        _ => Box::new(Balloon::new(true)),
    };
    let memory = guest_memory();
    let (interrupt, irq) = interrupt();
    let mut transport = MmioTransport::new(device, memory.clone(), interrupt);
    for _ in 0..MAX_OPS * 4 {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        if op & 7 >= 6 {
            let addr = u64::from(input.u16()) * 2;
            let len = usize::from(input.u8());
            let _ = memory.write_slice(input.bytes(len), GuestAddress(addr));
            continue;
        }
        // Registers and the first bytes of the config space (0x100), and
        // now and then any offset in the 4 KiB window.
        let offset = if op & 0x80 != 0 {
            u64::from(input.u16() % 0x1000)
        } else {
            u64::from(input.u8() & 0xfc) + if op & 0x40 != 0 { 0x100 } else { 0 }
        };
        let width = [4usize, 4, 4, 1, 2, 8, 3, 0][usize::from(op >> 3 & 7)];
        if op & 7 < 4 {
            let value = input.u64().to_le_bytes();
            transport.write(0xd000_0000, offset, &value[..width]);
        } else {
            let mut value = [0u8; 8];
            transport.read(0xd000_0000, offset, &mut value[..width]);
            if offset == 0 && width == 4 {
                assert_eq!(
                    u32::from_le_bytes(value[..4].try_into().unwrap()),
                    0x7472_6976
                );
            }
        }
    }
    // How often the device interrupted the guest.
    irq.read().unwrap_or(0)
}
