//! A guest-side virtio-net driver on the same hand-laid split queues as
//! the vsock harness: it posts rx buffers and tx frames the way Linux's
//! driver does and reads back what the device returned. Also: a private
//! network namespace with a tap in it, for the tests on a real tap.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmrun_vmm::devices::virtio::net::chain::VNET_HDR_SIZE;

use super::vsock_guest::{wait_readable, GuestQueue, WRITE};

pub const MEMORY_SIZE: usize = 64 << 20;
/// Linux's small rx buffers: the header and a 1518-byte frame.
pub const RX_BUFFER: u32 = VNET_HDR_SIZE as u32 + 1518;
const TX_AREA: u64 = 0x10_0000;
/// Room for a header and the largest frame.
const TX_SLOT: u64 = 0x1_1000;
const TX_SLOTS: u64 = 64;
const RX_AREA: u64 = 0x200_0000;
const RX_SLOT: u64 = 0x1_1000;
const RX_SLOTS: u64 = 128;
/// Scratch space for hand-made chains.
pub const SCRATCH: u64 = 0x3a0_0000;

/// The driver: rx and tx queues plus buffer bookkeeping.
pub struct NetGuest {
    pub memory: &'static GuestMemoryMmap,
    pub rx: GuestQueue,
    pub tx: GuestQueue,
    pub irq: EventFd,
    rx_buffers: HashMap<u16, u64>,
    next_rx_slot: u64,
    next_tx_slot: u64,
}

/// What came back on the rx queue.
#[derive(Debug, PartialEq, Eq)]
pub enum Rx {
    Frame(Vec<u8>),
    /// Returned unused (length 0).
    Empty,
}

impl NetGuest {
    pub fn new() -> NetGuest {
        // Leaked so the queues can borrow it for 'static; tests are
        // short-lived processes.
        let memory: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).unwrap(),
        ));
        NetGuest {
            memory,
            rx: GuestQueue::new(memory, 0),
            tx: GuestQueue::new(memory, 0x1_0000),
            irq: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            rx_buffers: HashMap::new(),
            next_rx_slot: 0,
            next_tx_slot: 0,
        }
    }

    pub fn queues(&self) -> Vec<Queue> {
        vec![self.rx.queue(), self.tx.queue()]
    }

    /// Posts `count` rx buffers of RX_BUFFER bytes.
    pub fn give_rx(&mut self, count: usize) {
        self.give_rx_sized(count, RX_BUFFER);
    }

    /// Posts `count` one-descriptor rx buffers of `size` bytes.
    pub fn give_rx_sized(&mut self, count: usize, size: u32) {
        assert!(u64::from(size) <= RX_SLOT);
        for _ in 0..count {
            let addr = RX_AREA + (self.next_rx_slot % RX_SLOTS) * RX_SLOT;
            self.next_rx_slot += 1;
            self.post_rx(&[(addr, size, WRITE)]);
        }
    }

    /// Posts a hand-made rx chain; what lands in it is read from its first
    /// descriptor's address on, as if the chain were contiguous.
    pub fn post_rx(&mut self, buffers: &[(u64, u32, u16)]) -> u16 {
        let head = self.rx.add(buffers);
        self.rx_buffers.insert(head, buffers[0].0);
        head
    }

    /// Posts a frame on the tx queue: header and frame in separate
    /// descriptors. Returns the chain's head.
    pub fn send(&mut self, frame: &[u8]) -> u16 {
        let addr = TX_AREA + (self.next_tx_slot % TX_SLOTS) * TX_SLOT;
        self.next_tx_slot += 1;
        self.memory
            .write_slice(&[0u8; VNET_HDR_SIZE], GuestAddress(addr))
            .unwrap();
        let frame_addr = addr + 0x10;
        self.memory
            .write_slice(frame, GuestAddress(frame_addr))
            .unwrap();
        self.tx.add(&[
            (addr, VNET_HDR_SIZE as u32, 0),
            (frame_addr, frame.len() as u32, 0),
        ])
    }

    /// Everything the device returned on rx since the last call, with the
    /// header checked: all zeros but num_buffers = 1.
    pub fn received(&mut self) -> Vec<Rx> {
        self.rx
            .take_used()
            .into_iter()
            .map(|(head, len)| {
                let Some(addr) = self.rx_buffers.remove(&head) else {
                    panic!("used head {head} (len {len}) was not posted");
                };
                if len == 0 {
                    return Rx::Empty;
                }
                assert!(len as usize > VNET_HDR_SIZE, "used length {len}");
                let mut header = [0u8; VNET_HDR_SIZE];
                self.memory
                    .read_slice(&mut header, GuestAddress(addr))
                    .unwrap();
                assert_eq!(header, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
                let mut frame = vec![0u8; len as usize - VNET_HDR_SIZE];
                self.memory
                    .read_slice(&mut frame, GuestAddress(addr + VNET_HDR_SIZE as u64))
                    .unwrap();
                Rx::Frame(frame)
            })
            .collect()
    }

    /// Just the frames of [`Self::received`].
    pub fn frames(&mut self) -> Vec<Vec<u8>> {
        self.received()
            .into_iter()
            .filter_map(|rx| match rx {
                Rx::Frame(frame) => Some(frame),
                Rx::Empty => None,
            })
            .collect()
    }

    /// Waits (poll on the irqfd, bounded) until `done` holds for the
    /// frames received so far; returns them all.
    pub fn wait_frames(&mut self, mut done: impl FnMut(&[Vec<u8>]) -> bool) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut all = Vec::new();
        loop {
            all.extend(self.frames());
            if done(&all) {
                return all;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out; received {} frames", all.len());
            wait_readable(self.irq.as_raw_fd(), left);
            let _ = self.irq.read();
        }
    }

    /// Waits until the device returned `count` tx chains.
    pub fn wait_tx_used(&mut self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut returned = 0;
        loop {
            returned += self.tx.take_used().len();
            if returned >= count {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out; {returned} of {count} returned");
            wait_readable(self.irq.as_raw_fd(), left);
            let _ = self.irq.read();
        }
    }
}

impl Default for NetGuest {
    fn default() -> Self {
        Self::new()
    }
}

/// An Ethernet frame of `len` bytes from `src` to `dst` with a local
/// experimental EtherType (0x88b5) and a payload made of `tag`.
pub fn frame(dst: [u8; 6], src: [u8; 6], tag: u8, len: usize) -> Vec<u8> {
    assert!(len >= 14);
    let mut frame = Vec::with_capacity(len);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&0x88b5u16.to_be_bytes());
    frame.extend((0..len - 14).map(|i| tag.wrapping_add(i as u8)));
    frame
}

/// Moves the calling thread into a network namespace of its own: a tap
/// made there, and all its traffic, stays there and goes with the
/// thread. Fails (never skips) without the privilege to do so.
pub fn enter_private_netns() {
    // SAFETY: unshare takes flags only; CLONE_NEWNET affects this thread.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        ret,
        0,
        "this test needs a network namespace of its own (root or CAP_SYS_ADMIN): {}",
        std::io::Error::last_os_error()
    );
}

/// struct ifreq with a sockaddr_in or the flags in its union.
#[repr(C)]
struct IfReqAddr {
    name: [u8; 16],
    addr: libc::sockaddr_in,
    _pad: [u8; 8],
}

fn ifreq(name: &str) -> IfReqAddr {
    // SAFETY: IfReqAddr is plain old data; all zeros is a valid value.
    let mut req: IfReqAddr = unsafe { std::mem::zeroed() };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    req
}

fn sockaddr(ip: [u8; 4]) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    }
}

/// Gives interface `name` (in this thread's namespace) the address
/// `ip`/24 and brings it up.
pub fn configure_interface(name: &str, ip: [u8; 4]) {
    // Any socket will do for the ioctls; binding needs no interface up.
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let fd = socket.as_raw_fd();
    let ioctl = |request, req: &mut IfReqAddr, what: &str| {
        // SAFETY: the SIOC[GS]IF* requests read or write one struct ifreq
        // (40 bytes), which IfReqAddr is.
        let ret = unsafe { libc::ioctl(fd, request, req as *mut IfReqAddr) };
        assert_eq!(ret, 0, "{what} {name}: {}", std::io::Error::last_os_error());
    };
    let mut req = ifreq(name);
    req.addr = sockaddr(ip);
    ioctl(libc::SIOCSIFADDR, &mut req, "address");
    let mut req = ifreq(name);
    req.addr = sockaddr([255, 255, 255, 0]);
    ioctl(libc::SIOCSIFNETMASK, &mut req, "netmask");
    let mut req = ifreq(name);
    ioctl(libc::SIOCGIFFLAGS, &mut req, "flags of");
    // ifr_flags is the first member of the union, where `addr` starts.
    let flags = req.addr.sin_family as libc::c_short | libc::IFF_UP as libc::c_short;
    req.addr.sin_family = flags as libc::sa_family_t;
    ioctl(libc::SIOCSIFFLAGS, &mut req, "bring up");
}

/// Whether interface `name` exists in this thread's namespace.
pub fn interface_exists(name: &str) -> bool {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: `name` is a NUL-terminated string.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}
