//! virtio-net driven through hand-laid split queues as Linux's driver
//! would: frames both ways over a socket-pair backend and over a real tap
//! device (inside a network namespace each test makes for itself, so no
//! frame can reach another host), and guest chains that are wrong in every
//! way the device must survive.

mod support;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use support::net_guest::*;
use support::vsock_guest::WRITE;
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress};
use vmrun_vmm::config::NetConfig;
use vmrun_vmm::devices::virtio::net::chain::{MAX_FRAME, VNET_HDR_SIZE};
use vmrun_vmm::devices::virtio::net::mac::MacAddr;
use vmrun_vmm::devices::virtio::net::tap::Tap;
use vmrun_vmm::devices::virtio::net::worker::Worker;
use vmrun_vmm::devices::virtio::net::{Net, NetStats, RX_QUEUE, TX_QUEUE};
use vmrun_vmm::devices::virtio::{VirtioDevice, VirtioInterrupt};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x02];
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x01];
const H: u32 = VNET_HDR_SIZE as u32;

fn to_peer(tag: u8, len: usize) -> Vec<u8> {
    frame(PEER_MAC, GUEST_MAC, tag, len)
}

fn to_guest(tag: u8, len: usize) -> Vec<u8> {
    frame(GUEST_MAC, PEER_MAC, tag, len)
}

/// A socket pair: the device's end (non-blocking) and the test's.
fn backend_pair() -> (UnixDatagram, UnixDatagram) {
    let (backend, peer) = UnixDatagram::pair().unwrap();
    backend.set_nonblocking(true).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    (backend, peer)
}

struct Setup {
    guest: NetGuest,
    worker: Worker,
    peer: UnixDatagram,
    stats: Arc<NetStats>,
}

/// A worker served synchronously by the test: no thread, every step explicit.
fn setup() -> Setup {
    let (backend, peer) = backend_pair();
    let guest = NetGuest::new();
    let interrupt = Arc::new(VirtioInterrupt::new(guest.irq.try_clone().unwrap()));
    let stats = Arc::new(NetStats::default());
    let worker = Worker::new(
        guest.memory.clone(),
        guest.queues(),
        interrupt,
        Box::new(backend),
        stats.clone(),
    );
    Setup {
        guest,
        worker,
        peer,
        stats,
    }
}

impl Setup {
    /// Runs the device once, as after a wake-up: tx, then rx.
    fn step(&mut self) -> Vec<Vec<u8>> {
        self.worker
            .on_backend_event((libc::EPOLLIN | libc::EPOLLOUT) as u32);
        self.worker.process_tx().unwrap();
        self.worker.process_rx().unwrap();
        self.guest.frames()
    }

    fn peer_recv(&self) -> Vec<u8> {
        let mut buf = vec![0u8; MAX_FRAME + 1];
        let n = self.peer.recv(&mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    /// Whether a frame waits for the test on the peer socket.
    fn peer_has_frame(&self) -> bool {
        support::vsock_guest::wait_readable(self.peer.as_raw_fd(), Duration::ZERO)
    }

    /// Whether a frame waits in the backend, unread by the device.
    fn backend_has_frame(&self) -> bool {
        support::vsock_guest::wait_readable(self.worker.backend.as_raw_fd(), Duration::ZERO)
    }
}

#[test]
fn tx_frames_reach_the_backend_whatever_the_layout() {
    let mut s = setup();
    let small = to_peer(1, 60);
    let full = to_peer(2, 1514);
    let largest = to_peer(3, MAX_FRAME);
    for frame in [&small, &full, &largest] {
        s.guest.send(frame);
    }
    assert!(s.step().is_empty());
    assert_eq!(s.peer_recv(), small);
    assert_eq!(s.peer_recv(), full);
    assert_eq!(s.peer_recv(), largest);
    let used = s.guest.tx.take_used();
    assert_eq!(used.len(), 3);
    assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");

    // Header and frame in one buffer; the header split over two
    // descriptors; the frame over three.
    let frame = to_peer(4, 100);
    let mut bytes = vec![0u8; VNET_HDR_SIZE];
    bytes.extend_from_slice(&frame);
    s.guest
        .memory
        .write_slice(&bytes, GuestAddress(SCRATCH))
        .unwrap();
    s.guest.tx.add(&[(SCRATCH, bytes.len() as u32, 0)]);
    s.guest.tx.add(&[
        (SCRATCH, 5, 0),
        (SCRATCH + 5, 7, 0),
        (SCRATCH + 12, 30, 0),
        (SCRATCH + 42, 1, 0),
        (SCRATCH + 43, bytes.len() as u32 - 43, 0),
    ]);
    s.step();
    assert_eq!(s.peer_recv(), frame);
    assert_eq!(s.peer_recv(), frame);
    let stats = s.stats.snapshot();
    assert_eq!(stats.tx_frames, 5);
    assert_eq!(stats.tx_bytes, (60 + 1514 + MAX_FRAME + 100 + 100) as u64);
    assert_eq!(stats.tx_bad_chains, 0);
}

#[test]
fn backend_frames_come_out_on_rx() {
    let mut s = setup();
    let frames = [to_guest(1, 60), to_guest(2, 1514), to_guest(3, 14)];
    for frame in &frames {
        s.peer.send(frame).unwrap();
    }
    s.guest.give_rx(3);
    let received = s.step();
    assert_eq!(received, frames.to_vec());
    let stats = s.stats.snapshot();
    assert_eq!((stats.rx_frames, stats.rx_bytes), (3, 60 + 1514 + 14));

    // A buffer split in three: header alone, then the frame in two parts.
    let frame = to_guest(4, 300);
    s.peer.send(&frame).unwrap();
    s.guest.rx.take_used();
    let head = s.guest.post_rx(&[
        (SCRATCH, H, WRITE),
        (SCRATCH + 0x1000, 100, WRITE),
        (SCRATCH + 0x2000, 1000, WRITE),
    ]);
    s.step_raw();
    assert_eq!(s.guest.rx.take_used(), vec![(head, H + 300)]);
    let mut got = vec![0u8; 300];
    s.guest
        .memory
        .read_slice(&mut got[..100], GuestAddress(SCRATCH + 0x1000))
        .unwrap();
    s.guest
        .memory
        .read_slice(&mut got[100..], GuestAddress(SCRATCH + 0x2000))
        .unwrap();
    assert_eq!(got, frame);
}

impl Setup {
    /// [`Self::step`] without reading back the rx queue.
    fn step_raw(&mut self) {
        self.worker
            .on_backend_event((libc::EPOLLIN | libc::EPOLLOUT) as u32);
        self.worker.process_tx().unwrap();
        self.worker.process_rx().unwrap();
    }
}

#[test]
fn frames_are_read_only_when_a_buffer_waits() {
    let mut s = setup();
    let frames: Vec<Vec<u8>> = (0..5).map(|i| to_guest(i, 60 + usize::from(i))).collect();
    for frame in &frames {
        s.peer.send(frame).unwrap();
    }
    assert!(s.step().is_empty());
    assert!(s.backend_has_frame(), "nothing read without an rx buffer");
    s.guest.give_rx(1);
    assert_eq!(s.step(), vec![frames[0].clone()]);
    assert!(s.backend_has_frame(), "one buffer, one frame read");
    s.guest.give_rx(2);
    assert_eq!(s.step(), frames[1..3].to_vec());
    s.guest.give_rx(8);
    assert_eq!(s.step(), frames[3..].to_vec(), "in order, none lost");
    // The remaining buffers stay the guest's until frames come.
    assert!(s.step().is_empty());
    s.peer.send(&frames[0]).unwrap();
    assert_eq!(s.step(), vec![frames[0].clone()]);
}

/// Posts each bad tx chain followed by a good frame: the bad one comes
/// back with length 0, the good one reaches the backend.
#[test]
fn malformed_tx_chains_fail_alone() {
    let mut s = setup();
    s.guest
        .memory
        .write_slice(&vec![0u8; 0x2_0000], GuestAddress(SCRATCH))
        .unwrap();
    let memory_end = MEMORY_SIZE as u64;
    type Case = (&'static str, Vec<(u64, u32, u16)>);
    let cases: Vec<Case> = vec![
        ("outside memory", vec![(memory_end - 8, H + 60, 0)]),
        (
            "frame outside memory",
            vec![(SCRATCH, H, 0), (memory_end, 60, 0)],
        ),
        ("wraps around", vec![(u64::MAX - 16, H + 60, 0)]),
        (
            "zero length",
            vec![(SCRATCH, H, 0), (SCRATCH + 0x100, 0, 0)],
        ),
        (
            "zero-length header",
            vec![(SCRATCH, 0, 0), (SCRATCH, 60, 0)],
        ),
        ("device-writable", vec![(SCRATCH, H + 60, WRITE)]),
        (
            "writable frame",
            vec![(SCRATCH, H, 0), (SCRATCH + 0x100, 60, WRITE)],
        ),
        ("header too short", vec![(SCRATCH, 8, 0)]),
        ("header only", vec![(SCRATCH, H, 0)]),
        ("runt frame", vec![(SCRATCH, H + 13, 0)]),
        (
            "oversized frame",
            vec![(SCRATCH, H, 0), (SCRATCH + 0x100, MAX_FRAME as u32 + 1, 0)],
        ),
        (
            "oversized in many pieces",
            (0..17).map(|i| (SCRATCH + i * 0x1000, 0x1000, 0)).collect(),
        ),
    ];
    let mut bad = 0;
    for (what, chain) in cases {
        s.guest.tx.take_used();
        let head = s.guest.tx.add(&chain);
        let good = to_peer(bad as u8, 60);
        let good_head = s.guest.send(&good);
        s.step();
        assert_eq!(
            s.guest.tx.take_used(),
            vec![(head, 0), (good_head, 0)],
            "{what}"
        );
        assert_eq!(s.peer_recv(), good, "{what}: the next frame goes through");
        assert!(!s.peer_has_frame(), "{what}: nothing else was sent");
        bad += 1;
        assert_eq!(s.stats.snapshot().tx_bad_chains, bad, "{what}");
    }

    // A descriptor whose next is itself, and one whose next is outside
    // the table.
    for (what, next) in [("loop", None), ("dangling next", Some(300u16))] {
        s.guest.tx.take_used();
        let head = s.guest.tx.add_raw(|first| {
            vec![RawDescriptor::from(Descriptor::new(
                SCRATCH,
                H + 60,
                VRING_DESC_F_NEXT as u16,
                next.unwrap_or(first),
            ))]
        });
        let good = to_peer(9, 60);
        let good_head = s.guest.send(&good);
        s.step();
        assert_eq!(
            s.guest.tx.take_used(),
            vec![(head, 0), (good_head, 0)],
            "{what}"
        );
        assert_eq!(s.peer_recv(), good, "{what}");
        bad += 1;
    }
    let stats = s.stats.snapshot();
    assert_eq!(stats.tx_bad_chains, bad);
    assert_eq!(stats.tx_frames, bad);
}

#[test]
fn malformed_rx_buffers_are_returned_unused_and_the_frame_stays() {
    let mut s = setup();
    let frame = to_guest(7, 200);
    s.peer.send(&frame).unwrap();
    let memory_end = MEMORY_SIZE as u64;
    let bad_heads = [
        s.guest.post_rx(&[(SCRATCH, RX_BUFFER, 0)]), // device-readable
        s.guest.post_rx(&[(SCRATCH, 0, WRITE)]),     // zero length
        s.guest.post_rx(&[(memory_end - 100, RX_BUFFER, WRITE)]), // outside memory
        s.guest.post_rx(&[(u64::MAX - 100, RX_BUFFER, WRITE)]), // wraps around
        s.guest
            .post_rx(&[(SCRATCH, H, WRITE), (SCRATCH + 0x1000, 400, 0)]), // half readable
    ];
    let loop_head = s.guest.rx.add_raw(|first| {
        vec![RawDescriptor::from(Descriptor::new(
            SCRATCH,
            RX_BUFFER,
            (VRING_DESC_F_NEXT | virtio_bindings::virtio_ring::VRING_DESC_F_WRITE) as u16,
            first,
        ))]
    });
    s.step_raw();
    let mut expected: Vec<(u16, u32)> = bad_heads.iter().map(|&h| (h, 0)).collect();
    expected.push((loop_head, 0));
    let used = s.guest.rx.take_used();
    assert_eq!(used, expected, "each bad buffer comes back empty");
    assert_eq!(s.stats.snapshot().rx_bad_chains, 6);
    assert!(s.backend_has_frame(), "the frame was not read for them");
    // The next good buffer gets it.
    let head = s.guest.post_rx(&[(SCRATCH + 0x4000, RX_BUFFER, WRITE)]);
    s.step_raw();
    assert_eq!(s.guest.rx.take_used(), vec![(head, H + 200)]);
    let mut got = vec![0u8; 200];
    s.guest
        .memory
        .read_slice(&mut got, GuestAddress(SCRATCH + 0x4000 + u64::from(H)))
        .unwrap();
    assert_eq!(got, frame);
    assert_eq!(s.stats.snapshot().rx_frames, 1);
}

#[test]
fn a_too_small_rx_buffer_drops_that_frame_only() {
    let mut s = setup();
    let big = to_guest(1, 1000);
    let small = to_guest(2, 60);
    let exact = to_guest(3, 100);
    for frame in [&big, &small, &exact] {
        s.peer.send(frame).unwrap();
    }
    s.guest.give_rx_sized(1, H + 999); // one byte short for `big`
    s.guest.give_rx_sized(1, H + 60);
    s.guest.give_rx_sized(1, H + 100);
    let received = s.guest_step();
    assert_eq!(
        received,
        vec![Rx::Empty, Rx::Frame(small), Rx::Frame(exact)]
    );
    assert_eq!(s.stats.snapshot().rx_dropped, 1);
    // A buffer with room for the header alone.
    let frame = to_guest(4, 60);
    s.peer.send(&frame).unwrap();
    s.guest.give_rx_sized(1, H);
    s.guest.give_rx(1);
    assert_eq!(s.guest_step(), vec![Rx::Empty]);
    assert_eq!(s.stats.snapshot().rx_dropped, 2);
    assert!(!s.backend_has_frame(), "the dropped frame is gone");
    s.peer.send(&frame).unwrap();
    assert_eq!(s.guest_step(), vec![Rx::Frame(frame)]);
}

impl Setup {
    fn guest_step(&mut self) -> Vec<Rx> {
        self.step_raw();
        self.guest.received()
    }
}

#[test]
fn a_backend_that_cannot_take_more_keeps_the_chains() {
    let mut s = setup();
    // The peer does not read: its queue fills and the backend says
    // WouldBlock. Nothing is dropped; the rest goes once it drains.
    let frames: Vec<Vec<u8>> = (0..24).map(|i| to_peer(i, 30_000)).collect();
    for frame in &frames {
        s.guest.send(frame);
    }
    s.worker.process_tx().unwrap();
    let first = s.guest.tx.take_used().len();
    assert!(first < frames.len(), "the backend filled up after {first}");
    assert_eq!(s.stats.snapshot().tx_errors, 0);
    let mut delivered = Vec::new();
    let mut returned = first;
    while delivered.len() < frames.len() {
        while s.peer_has_frame() {
            delivered.push(s.peer_recv());
        }
        s.step();
        returned += s.guest.tx.take_used().len();
    }
    assert!(delivered == frames, "all frames, in order");
    assert_eq!(returned, frames.len());
}

/// The device on its own thread, notified through its queue eventfds,
/// interrupting through the irqfd: many frames each way, in order; a
/// reset stops the thread and the backend serves the next activation.
#[test]
fn device_thread_carries_frames_both_ways() {
    let (backend, peer) = backend_pair();
    let mut guest = NetGuest::new();
    let mac = MacAddr(GUEST_MAC);
    let mut device = Net::new(Box::new(backend), mac).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(guest.irq.try_clone().unwrap()));
    device
        .activate(guest.memory.clone(), guest.queues(), interrupt)
        .unwrap();
    assert!(device.is_running());
    guest.give_rx(128);
    device.process_queue(RX_QUEUE as u16).unwrap();

    const FRAMES: usize = 1000;
    let expected: Vec<Vec<u8>> = (0..FRAMES)
        .map(|i| {
            let mut frame = to_guest(i as u8, 60 + i % 1400);
            frame[14..18].copy_from_slice(&(i as u32).to_be_bytes());
            frame
        })
        .collect();
    // Backend → guest; the guest refills its rx buffers as Linux does.
    let writer_frames = expected.clone();
    let writer_peer = peer.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for frame in &writer_frames {
            writer_peer.send(frame).unwrap(); // blocks while the device lags
        }
    });
    let mut received = Vec::new();
    while received.len() < FRAMES {
        let frames = guest.wait_frames(|f| !f.is_empty());
        guest.give_rx(frames.len());
        received.extend(frames);
        device.process_queue(RX_QUEUE as u16).unwrap();
    }
    writer.join().unwrap();
    assert!(
        received == expected,
        "backend → guest frames arrive in order"
    );

    // Guest → backend, in batches that fit the driver's tx slots.
    let reader_peer = peer.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut frames = Vec::new();
        let mut buf = vec![0u8; MAX_FRAME];
        for _ in 0..FRAMES {
            let n = reader_peer.recv(&mut buf).unwrap();
            frames.push(buf[..n].to_vec());
        }
        frames
    });
    let outgoing: Vec<Vec<u8>> = expected
        .iter()
        .map(|f| {
            let mut f = f.clone();
            f[..6].copy_from_slice(&PEER_MAC);
            f[6..12].copy_from_slice(&GUEST_MAC);
            f
        })
        .collect();
    for batch in outgoing.chunks(50) {
        for frame in batch {
            guest.send(frame);
        }
        device.process_queue(TX_QUEUE as u16).unwrap();
        guest.wait_tx_used(batch.len());
    }
    assert!(
        reader.join().unwrap() == outgoing,
        "guest → backend frames arrive in order"
    );
    let stats = device.stats();
    assert_eq!((stats.tx_frames, stats.rx_frames), (1000, 1000));
    assert_eq!(
        stats.tx_bad_chains + stats.rx_bad_chains + stats.rx_dropped,
        0
    );

    // Reset stops the thread; the backend serves the next activation.
    device.reset();
    assert!(!device.is_running());
    let mut guest = NetGuest::new();
    let interrupt = Arc::new(VirtioInterrupt::new(guest.irq.try_clone().unwrap()));
    device
        .activate(guest.memory.clone(), guest.queues(), interrupt)
        .unwrap();
    guest.give_rx(1);
    device.process_queue(RX_QUEUE as u16).unwrap();
    peer.send(&expected[0]).unwrap();
    assert_eq!(
        guest.wait_frames(|f| !f.is_empty()),
        vec![expected[0].clone()]
    );
    guest.send(&outgoing[1]);
    device.process_queue(TX_QUEUE as u16).unwrap();
    let mut buf = vec![0u8; MAX_FRAME];
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &outgoing[1][..]);
    drop(device);
}

/// Runs `test` on a thread of its own inside a fresh network namespace.
fn in_private_netns<T: Send + 'static>(test: impl FnOnce() -> T + Send + 'static) -> T {
    match std::thread::spawn(move || {
        enter_private_netns();
        test()
    })
    .join()
    {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

const HOST_IP: [u8; 4] = [10, 77, 0, 1];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;

fn ethertype(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

fn arp(op: u16, sha: [u8; 6], spa: [u8; 4], tha: [u8; 6], tpa: [u8; 4]) -> Vec<u8> {
    let dst = if op == 1 { [0xff; 6] } else { tha };
    let mut frame = Vec::new();
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&sha);
    frame.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4]); // Ethernet, IPv4
    frame.extend_from_slice(&op.to_be_bytes());
    frame.extend_from_slice(&sha);
    frame.extend_from_slice(&spa);
    frame.extend_from_slice(&tha);
    frame.extend_from_slice(&tpa);
    frame
}

/// op, sender MAC, sender IP, target IP.
type Arp = (u16, [u8; 6], [u8; 4], [u8; 4]);

fn parse_arp(frame: &[u8]) -> Option<Arp> {
    if frame.len() < 42 || ethertype(frame) != ETHERTYPE_ARP {
        return None;
    }
    let op = u16::from_be_bytes([frame[20], frame[21]]);
    Some((
        op,
        frame[22..28].try_into().unwrap(),
        frame[28..32].try_into().unwrap(),
        frame[38..42].try_into().unwrap(),
    ))
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A UDP datagram from the guest to the host (no UDP checksum: optional
/// over IPv4).
fn udp(dst_mac: [u8; 6], src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]); // id, DF, ttl, UDP
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&HOST_IP);
    let checksum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&src_port.to_be_bytes());
    frame.extend_from_slice(&dst_port.to_be_bytes());
    frame.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// The payload of a UDP-over-IPv4 frame to `port`, if it is one.
fn udp_payload(frame: &[u8], port: u16) -> Option<Vec<u8>> {
    if frame.len() < 42 || ethertype(frame) != ETHERTYPE_IPV4 || frame[23] != 17 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0xf) * 4;
    let udp = &frame[14 + ihl..];
    if u16::from_be_bytes([udp[2], udp[3]]) != port {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    Some(udp[8..len].to_vec())
}

/// Answers the host's ARP requests for the guest, as a guest would;
/// returns the host's MAC if a frame is its ARP reply.
fn answer_arp(guest: &mut NetGuest, frames: &[Vec<u8>]) -> Option<[u8; 6]> {
    let mut host_mac = None;
    for frame in frames {
        match parse_arp(frame) {
            Some((2, sha, spa, _)) if spa == HOST_IP => host_mac = Some(sha),
            Some((1, sha, spa, tpa)) if tpa == GUEST_IP => {
                guest.send(&arp(2, GUEST_MAC, GUEST_IP, sha, spa));
            }
            _ => {} // IPv6 neighbour discovery and the like
        }
    }
    host_mac
}

/// A guest on the device thread, talking to the host's IP stack through
/// a real tap: ARP both ways, then UDP both ways. Everything stays in the
/// test's own network namespace (10.77.0.0/24 exists nowhere else).
fn talk_over_a_tap(device: &mut Net) {
    let mut guest = NetGuest::new();
    let interrupt = Arc::new(VirtioInterrupt::new(guest.irq.try_clone().unwrap()));
    device
        .activate(guest.memory.clone(), guest.queues(), interrupt)
        .unwrap();
    guest.give_rx(64);
    device.process_queue(RX_QUEUE as u16).unwrap();
    let host = std::net::UdpSocket::bind((std::net::Ipv4Addr::from(HOST_IP), 5000)).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();

    // Guest → host: who has 10.77.0.1? The host answers with its MAC.
    guest.send(&arp(1, GUEST_MAC, GUEST_IP, [0; 6], HOST_IP));
    device.process_queue(TX_QUEUE as u16).unwrap();
    let frames = guest.wait_frames(|frames| {
        frames
            .iter()
            .any(|f| matches!(parse_arp(f), Some((2, _, spa, _)) if spa == HOST_IP))
    });
    let host_mac = answer_arp(&mut guest, &frames).expect("an ARP reply");
    guest.give_rx(frames.len());
    device.process_queue(RX_QUEUE as u16).unwrap();

    // Guest → host socket.
    guest.send(&udp(host_mac, 4000, 5000, b"hello from the guest"));
    device.process_queue(TX_QUEUE as u16).unwrap();
    let mut buf = [0u8; 100];
    let (n, from) = host.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello from the guest");
    assert_eq!(from, std::net::SocketAddr::from((GUEST_IP, 4000)));

    // Host socket → guest.
    host.send_to(
        b"hello from the host",
        (std::net::Ipv4Addr::from(GUEST_IP), 4000),
    )
    .unwrap();
    let mut payload = None;
    while payload.is_none() {
        let frames = guest.wait_frames(|f| !f.is_empty());
        guest.give_rx(frames.len());
        answer_arp(&mut guest, &frames);
        device.process_queue(TX_QUEUE as u16).unwrap();
        device.process_queue(RX_QUEUE as u16).unwrap();
        payload = frames.iter().find_map(|f| udp_payload(f, 4000));
    }
    assert_eq!(payload.unwrap(), b"hello from the host");
    let stats = device.stats();
    assert!(stats.tx_frames >= 2 && stats.rx_frames >= 2, "{stats:?}");
    assert_eq!(stats.tx_errors + stats.tx_bad_chains, 0, "{stats:?}");
    device.reset();
}

#[test]
fn a_real_tap_carries_arp_and_udp_both_ways() {
    in_private_netns(|| {
        let config: NetConfig = "vmrtest0".parse().unwrap();
        let mut device = Net::open(&config).unwrap();
        assert_eq!(device.mac(), MacAddr::derived_from("vmrtest0"));
        assert!(interface_exists("vmrtest0"), "the VMM created the tap");
        configure_interface("vmrtest0", HOST_IP);
        // The guest in these frames uses GUEST_MAC; the tap does not care.
        talk_over_a_tap(&mut device);
        drop(device);
        assert!(
            !interface_exists("vmrtest0"),
            "a tap the VMM created goes away with it"
        );
    });
}

#[test]
fn an_inherited_tap_fd_works_and_stays_the_callers() {
    in_private_netns(|| {
        // Whoever started the VMM made the tap and passes its fd.
        let original = Tap::open("vmrtest1").unwrap();
        configure_interface("vmrtest1", HOST_IP);
        let fd = original.as_raw_fd();
        let config: NetConfig = format!("fd={fd},mac=52:54:00:00:00:02").parse().unwrap();
        let mut device = Net::open(&config).unwrap();
        assert_eq!(device.mac(), MacAddr(GUEST_MAC));
        talk_over_a_tap(&mut device);
        drop(device);
        // SAFETY: F_GETFD on an fd number only reads its flags.
        assert!(
            unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0,
            "the inherited fd stays open"
        );
        assert!(interface_exists("vmrtest1"));
        drop(original);
        assert!(!interface_exists("vmrtest1"));
    });
}

#[test]
fn opening_a_tap_fails_clearly() {
    let file = std::fs::File::open("/dev/null").unwrap();
    let config: NetConfig = format!("fd={}", file.as_raw_fd()).parse().unwrap();
    let error = Net::open(&config).err().expect("not a tap").to_string();
    assert!(error.contains("not an attached tap device"), "{error}");
    in_private_netns(|| {
        let _busy = Tap::open("vmrtest2").unwrap();
        let error = Net::open(&"vmrtest2".parse().unwrap())
            .err()
            .expect("in use")
            .to_string();
        assert!(error.contains("vmrtest2"), "{error}");
    });
}

/// Built into a VM, the device is announced on the command line and its
/// queue notifications become ioeventfds at QueueNotify.
#[test]
fn a_vm_with_a_net_device_registers_ioeventfds_and_announces_it() {
    use vmrun_vmm::arch::layout::{CMDLINE_START, VIRTIO_MMIO_START};
    use vmrun_vmm::config::VmConfig;
    use vmrun_vmm::hypervisor::fake::FakeHypervisor;
    use vmrun_vmm::hypervisor::IoEventAddress;
    use vmrun_vmm::vm::MicroVm;

    in_private_netns(|| {
        let (_k, kernel) =
            support::temp_file(&support::elf_image(support::guests::PVH_HELLO, true));
        let mut config = VmConfig::new(&kernel);
        config.memory_mib = 64;
        config.nets = vec!["vmrtest3".parse().unwrap(), "vmrtest4".parse().unwrap()];
        let hypervisor = FakeHypervisor::new();
        let vm = MicroVm::build(&hypervisor, &config, Box::new(std::io::sink())).unwrap();
        let notify = |slot: u64| IoEventAddress::Mmio(VIRTIO_MMIO_START + slot * 0x1000 + 0x50);
        assert_eq!(
            hypervisor.record().ioevents,
            vec![
                (notify(0), Some(0)),
                (notify(0), Some(1)),
                (notify(1), Some(0)),
                (notify(1), Some(1))
            ]
        );
        let mut cmdline = vec![0u8; 256];
        vm.memory()
            .read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
            .unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(
            cmdline
                .contains("virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"),
            "{cmdline}"
        );
        assert!(interface_exists("vmrtest3") && interface_exists("vmrtest4"));
        drop(vm);
        assert!(!interface_exists("vmrtest3") && !interface_exists("vmrtest4"));
    });
}
