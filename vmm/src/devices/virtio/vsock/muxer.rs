//! The host side of the hybrid vsock: a unix listener for host-initiated
//! streams (`CONNECT <port>\n` → `OK <hostport>\n`), unix sockets
//! `<uds_path>_<port>` for guest-initiated ones, and the scheduling of the
//! packets owed to the guest.
//!
//! The muxer has its own epoll set (listener and streams) that the device
//! worker nests in its own, so the worker wakes for host traffic and the
//! muxer sorts out which socket it was.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{Addressing, Connection, State};
use super::packet::*;

/// The host's CID, as the guest addresses it.
pub const HOST_CID: u64 = 2;
/// Host-side ports for host-initiated streams start here, far above the
/// ports host listeners (`<uds>_<port>`) are named after.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// RSTs for packets that match no connection, waiting for an rx buffer;
/// past this the guest gets no answer (it times out instead).
const MAX_PENDING_RSTS: usize = 256;
/// Host clients still writing their CONNECT line.
const MAX_PENDING_CONNECTS: usize = 64;
/// How long a host client may take, from its connect to the `OK` line, to
/// write its CONNECT line and get the guest's answer. Past it the client's
/// socket is closed (it retries); a guest that did get the REQUEST gets an
/// RST, so a late RESPONSE finds no stream.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("vsock socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("vsock socket {0} is in use by another process")]
    InUse(PathBuf),
    #[error("cannot create the vsock epoll set: {0}")]
    Epoll(io::Error),
}

/// (host-side port, guest-side port).
type ConnKey = (u32, u32);

enum Owner {
    /// Accepted; reading the CONNECT line.
    Pending(PendingConnect),
    Conn(ConnKey),
}

struct PendingConnect {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// The bound listener; removes its socket file when dropped.
struct SocketFile {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub struct Muxer {
    addressing: Addressing,
    socket: SocketFile,
    epoll: Epoll,
    fds: HashMap<RawFd, Owner>,
    conns: HashMap<ConnKey, Connection>,
    local_ports: HashSet<u32>,
    next_local_port: u32,
    ready: VecDeque<ConnKey>,
    rsts: VecDeque<Header>,
    connect_timeout: Duration,
}

/// Binds `path`, replacing a stale socket file nobody listens on.
fn bind(path: &Path) -> Result<UnixListener, MuxerError> {
    let bind_error = |source| MuxerError::Bind {
        path: path.to_owned(),
        source,
    };
    match UnixListener::bind(path) {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            match UnixStream::connect(path) {
                Ok(_) => Err(MuxerError::InUse(path.to_owned())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    // Left behind by a VMM that did not exit cleanly.
                    std::fs::remove_file(path).map_err(bind_error)?;
                    UnixListener::bind(path).map_err(bind_error)
                }
                Err(_) => Err(bind_error(e)),
            }
        }
        Err(e) => Err(bind_error(e)),
    }
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Muxer, MuxerError> {
        let listener = bind(uds_path)?;
        let socket = SocketFile {
            listener,
            path: uds_path.to_owned(),
        };
        let bind_error = |source| MuxerError::Bind {
            path: uds_path.to_owned(),
            source,
        };
        socket.listener.set_nonblocking(true).map_err(bind_error)?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        let fd = socket.listener.as_raw_fd();
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            )
            .map_err(MuxerError::Epoll)?;
        Ok(Muxer {
            addressing: Addressing {
                host_cid: HOST_CID,
                guest_cid,
            },
            socket,
            epoll,
            fds: HashMap::new(),
            conns: HashMap::new(),
            local_ports: HashSet::new(),
            next_local_port: FIRST_LOCAL_PORT,
            ready: VecDeque::new(),
            rsts: VecDeque::new(),
            connect_timeout: CONNECT_TIMEOUT,
        })
    }

    /// Replaces [`CONNECT_TIMEOUT`] for the host clients accepted from now on.
    pub fn set_connect_timeout(&mut self, timeout: Duration) {
        self.connect_timeout = timeout;
    }

    /// When the earliest host-initiated connect runs out of time, if one
    /// is under way: the worker wakes up then to [`Self::expire_connects`].
    pub fn next_deadline(&self) -> Option<Instant> {
        let pending = self.fds.values().filter_map(|owner| match owner {
            Owner::Pending(pending) => Some(pending.deadline),
            Owner::Conn(_) => None,
        });
        let connecting = self.conns.values().filter_map(Connection::connect_deadline);
        pending.chain(connecting).min()
    }

    /// Closes the host clients whose connect ran out of time.
    pub fn expire_connects(&mut self) {
        let now = Instant::now();
        let expired: Vec<RawFd> = self
            .fds
            .iter()
            .filter_map(|(fd, owner)| match owner {
                Owner::Pending(pending) if pending.deadline <= now => Some(*fd),
                _ => None,
            })
            .collect();
        for fd in expired {
            // Dropping the stream closes it: the client sees EOF.
            self.fds.remove(&fd);
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, conn)| conn.connect_deadline().is_some_and(|d| d <= now))
            .map(|(key, _)| *key)
            .collect();
        for key in expired {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.expire();
            }
            self.refresh(key);
        }
    }

    /// The epoll set to wait on for host-side readiness.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn uds_path(&self) -> &Path {
        &self.socket.path
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Drops every stream (the device was reset); the listener stays.
    pub fn reset(&mut self) {
        self.fds.clear();
        self.conns.clear();
        self.local_ports.clear();
        self.ready.clear();
        self.rsts.clear();
    }

    /// Whether a packet for the guest may be waiting.
    pub fn has_rx(&self) -> bool {
        !self.rsts.is_empty() || !self.ready.is_empty()
    }

    /// The next packet for the guest, with at most `max_data` payload bytes.
    pub fn recv(&mut self, max_data: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(header) = self.rsts.pop_front() {
            return Some((header, Vec::new()));
        }
        // One pass over the connections queued now. A connection can have
        // something for the guest and still nothing for this buffer: host
        // data, and a buffer with room for the header only (`max_data` 0).
        // `refresh` queues it again, so looping until the queue is empty
        // would spin on it forever, and with it the device thread. Found by
        // fuzzing (fuzz/regressions/virtio_vsock/header-only-rx-buffer-spins).
        for _ in 0..self.ready.len() {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            let packet = conn.next_rx(self.addressing, max_data);
            self.refresh(key);
            if packet.is_some() {
                return packet;
            }
        }
        None
    }

    /// A packet from the guest.
    pub fn send(&mut self, header: &Header, data: &[u8]) {
        let key = (header.dst_port, header.src_port);
        let addressed_to_us =
            header.src_cid == self.addressing.guest_cid && header.dst_cid == HOST_CID;
        if addressed_to_us {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.on_guest_packet(header, data);
                self.refresh(key);
                return;
            }
            if header.op == OP_REQUEST && header.kind == TYPE_STREAM {
                self.guest_connect(header);
                return;
            }
        }
        self.reply_rst(header);
    }

    /// A guest chain was malformed but its header readable: the stream it
    /// names (if any) ends.
    pub fn reject(&mut self, header: &Header) {
        let key = (header.dst_port, header.src_port);
        match self.conns.get_mut(&key) {
            Some(conn) if header.src_cid == self.addressing.guest_cid => {
                conn.reset();
                self.refresh(key);
            }
            _ => self.reply_rst(header),
        }
    }

    /// Answers `header` with an RST, unless it is one (no RST ping-pong).
    fn reply_rst(&mut self, header: &Header) {
        if header.op == OP_RST || self.rsts.len() >= MAX_PENDING_RSTS {
            return;
        }
        self.rsts.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.addressing.guest_cid,
            src_port: header.dst_port,
            dst_port: header.src_port,
            len: 0,
            kind: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// The guest connects to host port P: connect to `<uds_path>_P`.
    fn guest_connect(&mut self, request: &Header) {
        let mut path = self.socket.path.clone().into_os_string();
        path.push(format!("_{}", request.dst_port));
        // A unix connect completes at once or fails (no listener, backlog
        // full), so a blocking connect does not stall the worker.
        let stream = match UnixStream::connect(&path) {
            Ok(stream) if stream.set_nonblocking(true).is_ok() => stream,
            _ => return self.reply_rst(request),
        };
        let conn = Connection::guest_initiated(stream, request);
        let key = (conn.local_port, conn.peer_port);
        if self.watch(&conn, key).is_err() {
            return self.reply_rst(request);
        }
        self.conns.insert(key, conn);
        self.refresh(key);
    }

    fn watch(&mut self, conn: &Connection, key: ConnKey) -> io::Result<()> {
        let Some(stream) = conn.stream() else {
            return Ok(());
        };
        let fd = stream.as_raw_fd();
        self.fds.insert(fd, Owner::Conn(key));
        // Edge-triggered: a connection waiting for guest credit or rx
        // buffers must not keep the worker spinning on a readable socket.
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        match self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, fd as u64),
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => self.epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(events, fd as u64),
            ),
            other => other,
        }
    }

    /// Queues `key` if it has packets for the guest; forgets it when over.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.is_finished() {
            self.forget(key);
            return;
        }
        if conn.stream().is_none() {
            // Killed: the fd is closed, it no longer names this connection.
            self.fds
                .retain(|_, owner| !matches!(owner, Owner::Conn(k) if *k == key));
        }
        if !conn.queued && conn.has_rx() {
            conn.queued = true;
            self.ready.push_back(key);
        }
    }

    fn forget(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            if let Some(stream) = conn.stream() {
                self.fds.remove(&stream.as_raw_fd());
            }
            self.fds
                .retain(|_, owner| !matches!(owner, Owner::Conn(k) if *k == key));
            self.local_ports.remove(&key.0);
        }
    }

    /// Handles whatever host sockets are ready, without blocking.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for event in &events[..n] {
                self.on_fd_event(event.data() as RawFd, event.events());
            }
            if n < events.len() {
                break;
            }
        }
        self.expire_connects();
    }

    fn on_fd_event(&mut self, fd: RawFd, events: u32) {
        if fd == self.socket.listener.as_raw_fd() {
            self.accept();
            return;
        }
        match self.fds.get(&fd) {
            Some(Owner::Conn(key)) => {
                let key = *key;
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.on_host_event(events);
                }
                self.refresh(key);
            }
            Some(Owner::Pending(_)) => self.read_connect_line(fd),
            None => {}
        }
    }

    fn accept(&mut self) {
        loop {
            match self.socket.listener.accept() {
                Ok((stream, _)) => {
                    let pending = self
                        .fds
                        .values()
                        .filter(|o| matches!(o, Owner::Pending(_)))
                        .count();
                    if pending >= MAX_PENDING_CONNECTS || stream.set_nonblocking(true).is_err() {
                        continue; // dropped: the client sees its socket close
                    }
                    let fd = stream.as_raw_fd();
                    let added = self.epoll.ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(
                            EventSet::IN | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
                            fd as u64,
                        ),
                    );
                    if added.is_ok() {
                        let pending = PendingConnect {
                            stream,
                            line: Vec::new(),
                            deadline: Instant::now() + self.connect_timeout,
                        };
                        self.fds.insert(fd, Owner::Pending(pending));
                        self.read_connect_line(fd);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return, // WouldBlock, or a transient accept error
            }
        }
    }

    /// Reads a host client's `CONNECT <port>\n` byte by byte, so nothing
    /// it sends after the line is taken from the stream.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(Owner::Pending(pending)) = self.fds.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8];
        let port = loop {
            match pending.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&pending.line),
                Ok(1) if pending.line.len() < MAX_CONNECT_LINE => pending.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // End of stream, an error or an overlong line.
                _ => break None,
            }
        };
        let Some(Owner::Pending(pending)) = self.fds.remove(&fd) else {
            return;
        };
        let Some(port) = port else {
            return; // dropping the stream closes it: the client sees EOF
        };
        let local_port = self.allocate_local_port();
        let conn = Connection::host_initiated(pending.stream, local_port, port, pending.deadline);
        let key = (local_port, port);
        if self.watch(&conn, key).is_err() {
            self.local_ports.remove(&local_port);
            return;
        }
        self.conns.insert(key, conn);
        self.refresh(key);
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if self.local_ports.insert(port) {
                return port;
            }
        }
    }

    /// The state of the stream between host port `local` and guest port
    /// `peer`, for tests and diagnostics.
    pub fn connection_state(&self, local: u32, peer: u32) -> Option<State> {
        self.conns.get(&(local, peer)).map(|c| c.state())
    }
}

/// `CONNECT <port>` (a trailing `\r` tolerated) → the port.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = line.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"connect 5"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
    }
}
