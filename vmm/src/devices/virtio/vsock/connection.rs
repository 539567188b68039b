//! One vsock stream between a guest port and a host unix socket: the
//! state, the credit accounting in both directions, and the control packets
//! owed to the guest.
//!
//! Guest → host: RW payloads are written to the socket; what the socket
//! does not take at once waits in `out`, which the guest's credit (our
//! `buf_alloc` minus what we have not forwarded yet) keeps under
//! [`BUF_ALLOC`]. Host → guest: the socket is read only while the guest
//! has credit (its `buf_alloc` minus what we sent and it has not consumed),
//! so a slow guest reader pushes back on the host writer.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::packet::*;

/// How much guest → host data we accept before the host reads it.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Forwarded bytes after which we tell the guest (a CREDIT_UPDATE) even
/// when no other packet carries the news; well under [`BUF_ALLOC`], so the
/// guest never runs out of credit while we have room.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST owed or sent, waiting for the guest's RESPONSE.
    LocalInit,
    Established,
    /// Over: only an owed RST may still go out.
    Dead,
}

/// The packet-independent part of every header this connection sends.
#[derive(Clone, Copy, Debug)]
pub struct Addressing {
    pub host_cid: u64,
    pub guest_cid: u64,
}

pub struct Connection {
    stream: Option<UnixStream>,
    /// Host-side port (our source port in packets to the guest).
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
    state: State,
    /// Host-initiated: when the guest must have answered the REQUEST.
    connect_deadline: Option<Instant>,

    // Host → guest.
    readable: bool,
    host_hup: bool,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,

    // Guest → host.
    out: VecDeque<u8>,
    /// Leading bytes of `out` that are ours (the `OK` line), not the guest's:
    /// they do not count as forwarded guest data.
    out_uncounted: usize,
    writable: bool,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    guest_shut_send: bool,
    guest_shut_recv: bool,
    /// The guest closed both ways: reset once `out` reached the host.
    close_after_flush: bool,

    // Control packets owed to the guest.
    owe_request: bool,
    owe_response: bool,
    owe_rst: bool,
    owe_credit_update: bool,
    owe_credit_request: bool,
    credit_request_sent: bool,
    owe_shutdown: Option<u32>,
    shutdown_sent: bool,

    /// Queued in the muxer's ready list.
    pub queued: bool,
}

impl Connection {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Connection {
        Connection {
            stream: Some(stream),
            local_port,
            peer_port,
            state,
            connect_deadline: None,
            // Edge-triggered readiness: assume data may be waiting already.
            readable: true,
            host_hup: false,
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            out: VecDeque::new(),
            out_uncounted: 0,
            writable: true,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            guest_shut_send: false,
            guest_shut_recv: false,
            close_after_flush: false,
            owe_request: false,
            owe_response: false,
            owe_rst: false,
            owe_credit_update: false,
            owe_credit_request: false,
            credit_request_sent: false,
            owe_shutdown: None,
            shutdown_sent: false,
            queued: false,
        }
    }

    /// A host client asked (CONNECT) for guest port `peer_port`; the guest
    /// must accept by `deadline`.
    pub fn host_initiated(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
    ) -> Connection {
        let mut conn = Connection::new(stream, local_port, peer_port, State::LocalInit);
        conn.owe_request = true;
        conn.connect_deadline = Some(deadline);
        conn
    }

    /// When the guest must have accepted, while it has not yet.
    pub fn connect_deadline(&self) -> Option<Instant> {
        self.connect_deadline
            .filter(|_| self.state == State::LocalInit)
    }

    /// The guest did not accept in time: the host client's socket closes,
    /// and a guest that got the REQUEST gets an RST.
    pub fn expire(&mut self) {
        let request_sent = !self.owe_request;
        self.kill();
        self.owe_rst = request_sent;
    }

    /// The guest's REQUEST `request` reached a host listener on `stream`.
    pub fn guest_initiated(stream: UnixStream, request: &Header) -> Connection {
        let mut conn = Connection::new(
            stream,
            request.dst_port,
            request.src_port,
            State::Established,
        );
        conn.update_peer_credit(request);
        conn.owe_response = true;
        conn
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn stream(&self) -> Option<&UnixStream> {
        self.stream.as_ref()
    }

    /// Dead with nothing left to send: the muxer forgets it.
    pub fn is_finished(&self) -> bool {
        self.state == State::Dead && !self.owe_rst
    }

    /// Ends the connection: the host socket closes now and the guest gets
    /// an RST.
    pub fn reset(&mut self) {
        self.kill();
        self.owe_rst = true;
    }

    /// Ends the connection without telling the guest (it reset it).
    fn kill(&mut self) {
        self.stream = None;
        self.state = State::Dead;
        self.out.clear();
        self.owe_request = false;
        self.owe_response = false;
        self.owe_credit_update = false;
        self.owe_credit_request = false;
        self.owe_shutdown = None;
    }

    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_request_sent = false;
        }
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.guest_shut_recv
            && self.owe_shutdown.is_none()
            && !self.shutdown_sent
            && self.peer_credit() > 0
    }

    /// Whether [`Self::next_rx`] may produce a packet.
    pub fn has_rx(&mut self) -> bool {
        if self.state == State::Established
            && self.readable
            && !self.guest_shut_recv
            && self.peer_credit() == 0
            && !self.credit_request_sent
        {
            // Host data waits for credit: ask the guest for its counters.
            self.owe_credit_request = true;
        }
        self.owe_rst
            || self.owe_request
            || self.owe_response
            || self.owe_credit_update
            || self.owe_credit_request
            || self.owe_shutdown.is_some()
            || self.can_send_data()
    }

    fn header(&mut self, addressing: Addressing, op: u16) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.owe_credit_update = false;
        Header {
            src_cid: addressing.host_cid,
            dst_cid: addressing.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, with at most `max_data` payload bytes.
    pub fn next_rx(
        &mut self,
        addressing: Addressing,
        max_data: usize,
    ) -> Option<(Header, Vec<u8>)> {
        if self.owe_rst {
            self.owe_rst = false;
            return Some((self.header(addressing, OP_RST), Vec::new()));
        }
        if self.state == State::Dead {
            return None;
        }
        if std::mem::take(&mut self.owe_request) {
            return Some((self.header(addressing, OP_REQUEST), Vec::new()));
        }
        if std::mem::take(&mut self.owe_response) {
            return Some((self.header(addressing, OP_RESPONSE), Vec::new()));
        }
        if self.can_send_data() && max_data > 0 {
            if let Some(packet) = self.read_host(addressing, max_data) {
                return Some(packet);
            }
        }
        if self.owe_credit_update {
            return Some((self.header(addressing, OP_CREDIT_UPDATE), Vec::new()));
        }
        if let Some(flags) = self.owe_shutdown.take() {
            self.shutdown_sent = true;
            let mut header = self.header(addressing, OP_SHUTDOWN);
            header.flags = flags;
            return Some((header, Vec::new()));
        }
        if std::mem::take(&mut self.owe_credit_request) {
            self.credit_request_sent = true;
            return Some((self.header(addressing, OP_CREDIT_REQUEST), Vec::new()));
        }
        None
    }

    /// Reads host data for an RW packet; on end of stream arranges a
    /// SHUTDOWN instead, on a socket error an RST.
    fn read_host(&mut self, addressing: Addressing, max_data: usize) -> Option<(Header, Vec<u8>)> {
        let want = max_data
            .min(self.peer_credit() as usize)
            .min(MAX_PAYLOAD as usize);
        let mut data = vec![0u8; want];
        let stream = self.stream.as_mut()?;
        match stream.read(&mut data) {
            Ok(0) => {
                // The host will send no more; if it closed the socket
                // altogether it will not read either.
                self.readable = false;
                let mut flags = SHUTDOWN_SEND;
                if self.host_hup {
                    flags |= SHUTDOWN_RCV;
                }
                self.owe_shutdown = Some(flags);
                None
            }
            Ok(n) => {
                data.truncate(n);
                self.rx_cnt += Wrapping(n as u32);
                let mut header = self.header(addressing, OP_RW);
                header.len = n as u32;
                Some((header, data))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                None
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(_) => {
                self.reset();
                self.owe_rst = false;
                Some((self.header(addressing, OP_RST), Vec::new()))
            }
        }
    }

    /// The host socket became ready (epoll event bits).
    pub fn on_host_event(&mut self, events: u32) {
        let hangup = (libc::EPOLLHUP | libc::EPOLLERR) as u32;
        if events & (libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32 | hangup) != 0 {
            self.readable = true;
        }
        if events & hangup != 0 {
            self.host_hup = true;
        }
        if events & (libc::EPOLLOUT as u32 | hangup) != 0 {
            self.writable = true;
            self.flush();
        }
    }

    /// A packet from the guest for this connection.
    pub fn on_guest_packet(&mut self, header: &Header, data: &[u8]) {
        if self.state == State::Dead {
            return;
        }
        if header.op == OP_RST {
            self.kill();
            return;
        }
        if header.kind != TYPE_STREAM {
            self.reset();
            return;
        }
        self.update_peer_credit(header);
        match header.op {
            OP_RESPONSE if self.state == State::LocalInit => {
                self.state = State::Established;
                let line = format!("OK {}\n", self.local_port);
                self.out_uncounted = line.len();
                self.out.extend(line.as_bytes());
                self.flush();
            }
            OP_RW if self.state == State::Established && !self.guest_shut_send => {
                let pending = (self.out.len() - self.out_uncounted) as u64;
                if pending + data.len() as u64 > u64::from(BUF_ALLOC) {
                    // The guest ignored our credit.
                    self.reset();
                    return;
                }
                self.out.extend(data);
                self.flush();
            }
            OP_CREDIT_UPDATE if self.state == State::Established => {}
            OP_CREDIT_REQUEST if self.state == State::Established => {
                self.owe_credit_update = true;
            }
            OP_SHUTDOWN if self.state == State::Established => {
                self.guest_shut_send |= header.flags & SHUTDOWN_SEND != 0;
                self.guest_shut_recv |= header.flags & SHUTDOWN_RCV != 0;
                if self.guest_shut_send && self.guest_shut_recv {
                    self.close_after_flush = true;
                }
                self.flush();
            }
            // A REQUEST for a live connection, a RESPONSE to nothing, an
            // unknown op: the guest and we disagree, so the stream ends.
            _ => self.reset(),
        }
    }

    /// Writes what waits in `out` to the host socket, as far as it takes it.
    fn flush(&mut self) {
        while self.writable && !self.out.is_empty() {
            let Some(stream) = self.stream.as_mut() else {
                return;
            };
            let (chunk, _) = self.out.as_slices();
            match stream.write(chunk) {
                Ok(n) => {
                    self.out.drain(..n);
                    let ours = n.min(self.out_uncounted);
                    self.out_uncounted -= ours;
                    self.fwd_cnt += Wrapping((n - ours) as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.reset();
                    return;
                }
            }
        }
        if !self.out.is_empty() {
            return;
        }
        if self.close_after_flush {
            self.reset();
            return;
        }
        if self.guest_shut_send {
            if let Some(stream) = &self.stream {
                let _ = stream.shutdown(Shutdown::Write);
            }
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.owe_credit_update = true;
        }
    }
}
