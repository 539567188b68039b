//! virtio-vsock driven through MockSplitQueue as Linux's driver would: the
//! connection handshakes in both directions over real unix sockets, data
//! and credit, shutdown and reset, and guest chains that are wrong in every
//! way the device must survive.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use support::vsock_guest::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress};
use vmrun_vmm::devices::virtio::vsock::connection::BUF_ALLOC;
use vmrun_vmm::devices::virtio::vsock::muxer::Muxer;
use vmrun_vmm::devices::virtio::vsock::packet::*;
use vmrun_vmm::devices::virtio::vsock::worker::Worker;
use vmrun_vmm::devices::virtio::vsock::{Vsock, TX_QUEUE};
use vmrun_vmm::devices::virtio::{VirtioDevice, VirtioInterrupt};

const GUEST_PORT: u32 = 49152;
const TX_BATCH: usize = 50;

struct Setup {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    guest: Guest,
    worker: Worker,
}

/// A worker served synchronously by the test: no thread, every step explicit.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let guest = Guest::new();
    let muxer = Muxer::new(GUEST_CID, &uds).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(guest.irq.try_clone().unwrap()));
    let worker = Worker::new(guest.memory.clone(), guest.queues(), interrupt, muxer);
    Setup {
        _dir: dir,
        uds,
        guest,
        worker,
    }
}

impl Setup {
    /// Runs the device once: tx, host sockets, rx.
    fn step(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.worker.process_tx().unwrap();
        self.worker.muxer.process_host_events();
        self.worker.process_rx().unwrap();
        self.guest.received()
    }

    fn listener(&self, port: u32) -> UnixListener {
        let mut path = self.uds.clone().into_os_string();
        path.push(format!("_{port}"));
        UnixListener::bind(path).unwrap()
    }

    /// Host CONNECT → guest REQUEST → guest RESPONSE → host OK line.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(&self.uds).unwrap();
        client
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        self.guest.give_rx(8);
        let packets = self.step();
        assert_eq!(packets.len(), 1, "{packets:?}");
        let request = packets[0].0;
        assert_eq!(request.op, OP_REQUEST);
        assert_eq!((request.src_cid, request.dst_cid), (HOST_CID, GUEST_CID));
        assert_eq!(request.dst_port, port);
        assert!(request.src_port >= 1 << 30, "ephemeral host port");
        assert_eq!(request.buf_alloc, BUF_ALLOC);
        self.guest
            .send(to_host(OP_RESPONSE, port, request.src_port), &[]);
        assert!(self.step().is_empty());
        let mut line = String::new();
        BufReader::new(&client).read_line(&mut line).unwrap();
        assert_eq!(line, format!("OK {}\n", request.src_port));
        (client, request.src_port)
    }

    /// Guest REQUEST → `<uds>_<port>` listener → RESPONSE.
    fn guest_connect(&mut self, listener: &UnixListener, port: u32) -> UnixStream {
        self.guest.give_rx(8);
        self.guest.send(to_host(OP_REQUEST, GUEST_PORT, port), &[]);
        let packets = self.step();
        assert_eq!(packets.len(), 1, "{packets:?}");
        let response = packets[0].0;
        assert_eq!(response.op, OP_RESPONSE);
        assert_eq!((response.src_port, response.dst_port), (port, GUEST_PORT));
        listener.accept().unwrap().0
    }

    /// Sends `header` and expects exactly one RST back for the same ports.
    fn expect_rst(&mut self, src_port: u32, dst_port: u32) {
        let packets = self.step();
        assert_eq!(packets.len(), 1, "{packets:?}");
        let rst = packets[0].0;
        assert_eq!(rst.op, OP_RST);
        assert_eq!((rst.src_port, rst.dst_port), (dst_port, src_port));
    }
}

fn read_exactly(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut data = vec![0u8; n];
    stream.read_exact(&mut data).unwrap();
    data
}

fn assert_closed(stream: &mut UnixStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut byte = [0u8];
    // A socket closed with our bytes unread reports a reset instead of EOF.
    match stream.read(&mut byte) {
        Ok(n) => assert_eq!(n, 0, "the client sees EOF"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
}

#[test]
fn host_connects_and_data_flows_both_ways() {
    let mut s = setup();
    let (mut client, host_port) = s.host_connect(1024);
    // Guest → host.
    s.guest.send(to_host(OP_RW, 1024, host_port), b"hello host");
    assert!(s.step().is_empty());
    assert_eq!(read_exactly(&mut client, 10), b"hello host");
    // Host → guest.
    client.write_all(b"hello guest").unwrap();
    let packets = s.step();
    assert_eq!(packets.len(), 1);
    let (header, data) = &packets[0];
    assert_eq!(header.op, OP_RW);
    assert_eq!((header.src_port, header.dst_port), (host_port, 1024));
    assert_eq!(data, b"hello guest");
    assert_eq!(header.fwd_cnt, 10, "we forwarded the guest's 10 bytes");
    // The guest resets: the client's socket closes.
    s.guest.send(to_host(OP_RST, 1024, host_port), &[]);
    assert!(s.step().is_empty(), "no answer to an RST");
    assert_closed(&mut client);
    assert_eq!(s.worker.muxer.connection_count(), 0);
}

#[test]
fn a_guest_that_refuses_the_connection_closes_the_client() {
    let mut s = setup();
    let mut client = UnixStream::connect(&s.uds).unwrap();
    client.write_all(b"CONNECT 7\n").unwrap();
    s.guest.give_rx(4);
    let request = s.step()[0].0;
    s.guest.send(to_host(OP_RST, 7, request.src_port), &[]);
    s.step();
    assert_closed(&mut client);
}

#[test]
fn bad_connect_lines_close_the_client() {
    let mut s = setup();
    for line in [&b"CONNECT x\n"[..], b"HELLO 5\n", &[b'A'; 100][..]] {
        let mut client = UnixStream::connect(&s.uds).unwrap();
        // All of it fits in the socket buffer before the device reads.
        client.write_all(line).unwrap();
        s.guest.give_rx(1);
        assert!(s.step().is_empty(), "no REQUEST for {line:?}");
        assert_closed(&mut client);
    }
}

#[test]
fn guest_connects_to_a_host_listener() {
    let mut s = setup();
    let listener = s.listener(5000);
    let mut host = s.guest_connect(&listener, 5000);
    s.guest.send(to_host(OP_RW, GUEST_PORT, 5000), b"ping");
    s.step();
    assert_eq!(read_exactly(&mut host, 4), b"ping");
    host.write_all(b"pong").unwrap();
    let packets = s.step();
    assert_eq!(packets[0].1, b"pong");
    // The guest closes both ways: the host sees EOF, the guest gets its RST.
    let mut shutdown = to_host(OP_SHUTDOWN, GUEST_PORT, 5000);
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    s.guest.send(shutdown, &[]);
    s.expect_rst(GUEST_PORT, 5000);
    assert_closed(&mut host);
}

#[test]
fn guest_connect_without_a_listener_is_reset() {
    let mut s = setup();
    s.guest.give_rx(2);
    s.guest.send(to_host(OP_REQUEST, GUEST_PORT, 6000), &[]);
    s.expect_rst(GUEST_PORT, 6000);
    // To a CID other than the host's, too.
    let mut request = to_host(OP_REQUEST, GUEST_PORT, 6000);
    request.dst_cid = 7;
    s.guest.send(request, &[]);
    s.expect_rst(GUEST_PORT, 6000);
}

#[test]
fn host_close_becomes_a_shutdown_and_the_guest_reset_ends_it() {
    let mut s = setup();
    let listener = s.listener(5001);
    let host = s.guest_connect(&listener, 5001);
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let packets = s.step();
    assert_eq!(packets.len(), 1, "{packets:?}");
    assert_eq!(packets[0].0.op, OP_SHUTDOWN);
    assert_eq!(packets[0].0.flags, SHUTDOWN_SEND, "the host may still read");
    drop(host);
    s.guest.send(to_host(OP_RST, GUEST_PORT, 5001), &[]);
    assert!(s.step().is_empty());
    assert_eq!(s.worker.muxer.connection_count(), 0);
}

#[test]
fn host_data_waits_for_guest_credit() {
    let mut s = setup();
    let listener = s.listener(5002);
    s.guest.give_rx(64);
    let mut request = to_host(OP_REQUEST, GUEST_PORT, 5002);
    request.buf_alloc = 1000;
    s.guest.send(request, &[]);
    assert_eq!(s.step()[0].0.op, OP_RESPONSE);
    let mut host = listener.accept().unwrap().0;
    host.write_all(&[7u8; 3000]).unwrap();
    let packets = s.step();
    let delivered: usize = packets.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(delivered, 1000, "no more than the guest's buf_alloc");
    assert_eq!(
        packets.last().unwrap().0.op,
        OP_CREDIT_REQUEST,
        "out of credit, the device asks for an update"
    );
    // The guest consumed it all and says so.
    let mut update = to_host(OP_CREDIT_UPDATE, GUEST_PORT, 5002);
    update.buf_alloc = 1000;
    update.fwd_cnt = 1000;
    s.guest.send(update, &[]);
    let packets = s.step();
    let delivered: usize = packets.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(delivered, 1000);
    // A credit request from the guest gets our counters back (in a
    // CREDIT_UPDATE, since no data packet can carry them: no credit).
    let mut credit_request = to_host(OP_CREDIT_REQUEST, GUEST_PORT, 5002);
    credit_request.buf_alloc = 1000;
    credit_request.fwd_cnt = 1000;
    s.guest.send(credit_request, &[]);
    let packets = s.step();
    assert!(packets
        .iter()
        .any(|(h, _)| h.op == OP_CREDIT_UPDATE && h.buf_alloc == BUF_ALLOC));
    host.flush().unwrap();
}

#[test]
fn a_guest_that_ignores_our_credit_is_reset() {
    let mut s = setup();
    let listener = s.listener(5003);
    let _host = s.guest_connect(&listener, 5003);
    // The host never reads: once its socket buffer and our BUF_ALLOC are
    // full, more data breaks the credit contract.
    let chunk = vec![1u8; MAX_PAYLOAD as usize];
    let mut reset = false;
    for _ in 0..64 {
        s.guest.send(to_host(OP_RW, GUEST_PORT, 5003), &chunk);
        let packets = s.step();
        if packets.iter().any(|(h, _)| h.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "the connection was reset");
}

/// Posts a tx chain made of `buffers`, expects it back with length 0 and,
/// when `rst` is set, an RST for the connection of the header at HEADER.
fn malformed(s: &mut Setup, buffers: &[(u64, u32, u16)], rst: bool) {
    s.guest.give_rx(2);
    s.guest.tx.take_used();
    let head = s.guest.tx.add(buffers);
    let packets = s.step();
    assert_eq!(s.guest.tx.take_used(), vec![(head, 0)], "chain returned");
    if rst {
        assert_eq!(packets.len(), 1, "{packets:?}");
        assert_eq!(packets[0].0.op, OP_RST);
    } else {
        assert!(packets.is_empty(), "{packets:?}");
    }
}

const HEADER_AT: u64 = SCRATCH;
const DATA_AT: u64 = SCRATCH + 0x1000;

fn header_in_memory(s: &Setup, header: Header) {
    s.guest
        .memory
        .write_slice(&header.to_bytes(), GuestAddress(HEADER_AT))
        .unwrap();
}

#[test]
fn malformed_tx_chains_fail_alone() {
    let mut s = setup();
    let listener = s.listener(5004);
    let mut host = s.guest_connect(&listener, 5004);
    let h = HEADER_SIZE as u32;
    let mut rw = to_host(OP_RW, GUEST_PORT, 5004);
    rw.len = 16;
    header_in_memory(&s, rw);

    // Before the header is readable nothing names a connection: dropped.
    malformed(&mut s, &[(HEADER_AT, 20, 0)], false); // shorter than 44 bytes
    malformed(&mut s, &[(HEADER_AT, 0, 0)], false); // zero length
    malformed(&mut s, &[(MEMORY_SIZE as u64 - 8, h, 0)], false); // outside memory
    malformed(&mut s, &[(u64::MAX - 16, h, 0)], false); // wraps around
    malformed(&mut s, &[(HEADER_AT, h, WRITE)], false); // device-writable header
                                                        // A loop: a descriptor whose next is itself.
    s.guest.give_rx(1);
    let head = s.guest.tx.add_raw(|first| {
        vec![RawDescriptor::from(Descriptor::new(
            HEADER_AT,
            h,
            VRING_DESC_F_NEXT as u16,
            first,
        ))]
    });
    assert!(s.step().is_empty());
    assert_eq!(s.guest.tx.take_used(), vec![(head, 0)]);
    // The connection survived all of that.
    assert_eq!(
        s.worker.muxer.connection_count(),
        1,
        "malformed chains without a header leave streams alone"
    );

    // With a readable header, the stream it names is reset.
    malformed(&mut s, &[(HEADER_AT, h, 0), (DATA_AT, 8, 0)], true); // len > buffers
    assert_closed(&mut host);
    assert_eq!(s.worker.muxer.connection_count(), 0);
}

#[test]
fn malformed_data_descriptors_reset_the_stream() {
    let h = HEADER_SIZE as u32;
    type Case = (&'static str, Vec<(u64, u32, u16)>, u32);
    let cases: Vec<Case> = vec![
        (
            "zero-length data",
            vec![(HEADER_AT, h, 0), (DATA_AT, 0, 0)],
            4,
        ),
        (
            "writable data",
            vec![(HEADER_AT, h, 0), (DATA_AT, 16, WRITE)],
            4,
        ),
        (
            "data outside memory",
            vec![(HEADER_AT, h, 0), (MEMORY_SIZE as u64, 16, 0)],
            4,
        ),
        (
            "len over 64 KiB",
            vec![(HEADER_AT, h, 0), (DATA_AT, 16, 0)],
            1 << 20,
        ),
    ];
    for (what, chain, len) in cases {
        let mut s = setup();
        let listener = s.listener(5005);
        let mut host = s.guest_connect(&listener, 5005);
        let mut rw = to_host(OP_RW, GUEST_PORT, 5005);
        rw.len = len;
        header_in_memory(&s, rw);
        s.guest.give_rx(2);
        s.guest.tx.take_used();
        let head = s.guest.tx.add(&chain);
        let packets = s.step();
        assert_eq!(s.guest.tx.take_used(), vec![(head, 0)], "{what}");
        assert_eq!(packets.len(), 1, "{what}: {packets:?}");
        assert_eq!(packets[0].0.op, OP_RST, "{what}");
        assert_closed(&mut host);
    }
}

#[test]
fn unknown_ops_and_types_are_reset() {
    let mut s = setup();
    let listener = s.listener(5006);
    let mut host = s.guest_connect(&listener, 5006);
    s.guest.send(to_host(99, GUEST_PORT, 5006), &[]);
    s.expect_rst(GUEST_PORT, 5006);
    assert_closed(&mut host);

    let mut host = s.guest_connect(&listener, 5006);
    let mut seqpacket = to_host(OP_RW, GUEST_PORT, 5006);
    seqpacket.kind = 2;
    s.guest.send(seqpacket, b"x");
    s.expect_rst(GUEST_PORT, 5006);
    assert_closed(&mut host);

    // Packets for no connection, and op 0 (INVALID), are answered with RST.
    s.guest.send(to_host(OP_RW, 1, 2), b"stray");
    s.expect_rst(1, 2);
    s.guest.send(to_host(0, 1, 2), &[]);
    s.expect_rst(1, 2);
    // A second REQUEST for a live stream resets it.
    let mut host = s.guest_connect(&listener, 5006);
    s.guest.send(to_host(OP_REQUEST, GUEST_PORT, 5006), &[]);
    s.expect_rst(GUEST_PORT, 5006);
    assert_closed(&mut host);
}

#[test]
fn a_connect_the_guest_does_not_answer_is_closed_after_the_timeout() {
    let mut s = setup();
    s.worker
        .muxer
        .set_connect_timeout(Duration::from_millis(200));
    let mut client = UnixStream::connect(&s.uds).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    s.guest.give_rx(4);
    let packets = s.step();
    assert_eq!(packets.len(), 1, "{packets:?}");
    assert_eq!(packets[0].0.op, OP_REQUEST);
    let host_port = packets[0].0.src_port;
    assert!(s.worker.muxer.next_deadline().is_some());
    assert!(s.step().is_empty(), "nothing happens before the deadline");
    assert_eq!(s.worker.muxer.connection_count(), 1);
    std::thread::sleep(Duration::from_millis(250));
    // The guest got the REQUEST, so it is told the stream is gone.
    s.expect_rst(1024, host_port);
    assert_closed(&mut client);
    assert_eq!(s.worker.muxer.connection_count(), 0);
    assert!(s.worker.muxer.next_deadline().is_none());
    // A late RESPONSE finds no stream.
    s.guest.send(to_host(OP_RESPONSE, 1024, host_port), &[]);
    s.expect_rst(1024, host_port);
    // The host client retries, and this time the guest answers in time.
    let (_client, _) = s.host_connect(1024);
    assert!(s.worker.muxer.next_deadline().is_none(), "established");
}

#[test]
fn silent_clients_and_unsent_requests_time_out_too() {
    let mut s = setup();
    s.worker
        .muxer
        .set_connect_timeout(Duration::from_millis(200));
    // Never writes its CONNECT line.
    let mut silent = UnixStream::connect(&s.uds).unwrap();
    // Writes it, but the guest never posts an rx buffer for the REQUEST.
    let mut unanswered = UnixStream::connect(&s.uds).unwrap();
    unanswered.write_all(b"CONNECT 9\n").unwrap();
    assert!(s.step().is_empty());
    assert_eq!(s.worker.muxer.connection_count(), 1);
    std::thread::sleep(Duration::from_millis(250));
    s.guest.give_rx(4);
    assert!(
        s.step().is_empty(),
        "no RST for a REQUEST the guest never saw"
    );
    assert_closed(&mut silent);
    assert_closed(&mut unanswered);
    assert_eq!(s.worker.muxer.connection_count(), 0);
    assert!(s.worker.muxer.next_deadline().is_none());
}

/// On its own thread the device wakes up for the deadline: no other event
/// is needed to close the client.
#[test]
fn device_thread_closes_an_unanswered_connect_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let mut guest = Guest::new();
    let mut device = Vsock::new(GUEST_CID, &uds).unwrap();
    device.set_connect_timeout(Duration::from_millis(300));
    let interrupt = Arc::new(VirtioInterrupt::new(guest.irq.try_clone().unwrap()));
    device
        .activate(guest.memory.clone(), guest.queues(), interrupt)
        .unwrap();
    guest.give_rx(8);
    device.process_queue(0).unwrap();
    let start = std::time::Instant::now();
    let mut client = UnixStream::connect(&uds).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let packets = guest.wait_rx(|p| !p.is_empty());
    assert_eq!(packets[0].0.op, OP_REQUEST);
    let packets = guest.wait_rx(|p| !p.is_empty());
    assert_eq!(packets[0].0.op, OP_RST);
    assert_closed(&mut client);
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(4),
        "closed after {elapsed:?}"
    );
}

#[test]
fn malformed_rx_buffers_are_returned_unused() {
    let mut s = setup();
    let listener = s.listener(5007);
    // Bad buffers first: read-only, short, outside memory, zero length.
    let bad = [
        (SCRATCH, RX_BUFFER, 0),
        (SCRATCH, 20, WRITE),
        (MEMORY_SIZE as u64, RX_BUFFER, WRITE),
        (SCRATCH, 0, WRITE),
    ];
    let heads: Vec<u16> = bad.iter().map(|b| s.guest.rx.add(&[*b])).collect();
    s.guest.send(to_host(OP_REQUEST, GUEST_PORT, 5007), &[]);
    s.worker.process_tx().unwrap();
    s.worker.process_rx().unwrap();
    let used = s.guest.rx.take_used();
    assert_eq!(
        used,
        heads.iter().map(|&h| (h, 0)).collect::<Vec<_>>(),
        "each bad buffer comes back empty"
    );
    // The RESPONSE waited for a good buffer.
    s.guest.give_rx(1);
    let packets = s.step();
    assert_eq!(packets[0].0.op, OP_RESPONSE);
    listener.accept().unwrap();
}

#[test]
fn a_split_rx_buffer_takes_header_and_payload_separately() {
    let mut s = setup();
    let listener = s.listener(5008);
    s.guest.give_rx(1);
    s.guest.send(to_host(OP_REQUEST, GUEST_PORT, 5008), &[]);
    assert_eq!(s.step()[0].0.op, OP_RESPONSE);
    let mut host = listener.accept().unwrap().0;
    host.write_all(b"split").unwrap();
    let head = s.guest.rx.add(&[
        (SCRATCH, HEADER_SIZE as u32, WRITE),
        (SCRATCH + 0x1000, 3, WRITE),
        (SCRATCH + 0x2000, 100, WRITE),
    ]);
    s.worker.muxer.process_host_events();
    s.worker.process_rx().unwrap();
    let used = s.guest.rx.take_used();
    assert!(used.contains(&(head, HEADER_SIZE as u32 + 5)), "{used:?}");
    let mut data = [0u8; 5];
    s.guest
        .memory
        .read_slice(&mut data[..3], GuestAddress(SCRATCH + 0x1000))
        .unwrap();
    s.guest
        .memory
        .read_slice(&mut data[3..], GuestAddress(SCRATCH + 0x2000))
        .unwrap();
    assert_eq!(&data, b"split");
}

/// The device on its own thread, notified through its queue eventfds,
/// interrupting through the irqfd: many small writes each way, in order.
#[test]
fn device_thread_carries_many_small_writes_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let mut guest = Guest::new();
    let mut device = Vsock::new(GUEST_CID, &uds).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(guest.irq.try_clone().unwrap()));
    device
        .activate(guest.memory.clone(), guest.queues(), interrupt)
        .unwrap();
    guest.give_rx(128);
    device.process_queue(0).unwrap();

    let mut client = UnixStream::connect(&uds).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let packets = guest.wait_rx(|p| !p.is_empty());
    let host_port = packets[0].0.src_port;
    assert_eq!(packets[0].0.op, OP_REQUEST);
    guest.send(to_host(OP_RESPONSE, 1024, host_port), &[]);
    device.process_queue(TX_QUEUE as u16).unwrap();
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {host_port}\n"));

    // Host → guest: 2000 writes of 10 bytes; the guest refills rx buffers
    // and reports what it consumed, as Linux does.
    const WRITES: usize = 2000;
    let writer = std::thread::spawn(move || {
        for i in 0..WRITES {
            client.write_all(format!("{i:09}\n").as_bytes()).unwrap();
        }
        client
    });
    let mut received = Vec::new();
    let mut consumed = 0u32;
    while received.len() < WRITES * 10 {
        for (header, data) in guest.wait_rx(|p| !p.is_empty()) {
            assert_eq!(header.op, OP_RW, "{header:?}");
            received.extend_from_slice(&data);
            consumed += data.len() as u32;
            guest.give_rx(1);
        }
        let mut update = to_host(OP_CREDIT_UPDATE, 1024, host_port);
        update.fwd_cnt = consumed;
        guest.send(update, &[]);
        device.process_queue(TX_QUEUE as u16).unwrap();
        device.process_queue(0).unwrap();
    }
    let expected: Vec<u8> = (0..WRITES)
        .flat_map(|i| format!("{i:09}\n").into_bytes())
        .collect();
    assert!(received == expected, "host → guest bytes arrive in order");
    let client = writer.join().unwrap();

    // Guest → host: 2000 small RW packets, in batches that fit the
    // driver's tx buffer slots.
    let reader_thread = std::thread::spawn(move || {
        let mut data = vec![0u8; WRITES * 10];
        reader.read_exact(&mut data).unwrap();
        data
    });
    for batch in (0..WRITES).collect::<Vec<_>>().chunks(TX_BATCH) {
        for i in batch {
            guest.send(
                to_host(OP_RW, 1024, host_port),
                format!("{i:09}\n").as_bytes(),
            );
        }
        device.process_queue(TX_QUEUE as u16).unwrap();
        // Wait for the device to return the batch before reusing slots.
        let mut returned = 0;
        while returned < batch.len() {
            returned += guest.tx.take_used().len();
            if returned < batch.len() {
                wait_readable(
                    std::os::fd::AsRawFd::as_raw_fd(&guest.irq),
                    Duration::from_secs(10),
                );
                let _ = guest.irq.read();
            }
        }
    }
    assert!(
        reader_thread.join().unwrap() == expected,
        "guest → host bytes arrive in order"
    );
    drop(client);

    // Reset stops the thread; the socket file stays until the device goes.
    device.reset();
    assert!(uds.exists());
    drop(device);
    assert!(!uds.exists(), "the socket file is removed");
}

#[test]
fn a_stale_socket_file_is_replaced_and_a_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    drop(UnixListener::bind(&uds).unwrap()); // leaves the file behind
    let device = Vsock::new(GUEST_CID, &uds).unwrap();
    assert!(Vsock::new(GUEST_CID, &uds).is_err(), "in use");
    drop(device);
    assert!(!uds.exists());
}

#[test]
fn config_space_holds_the_guest_cid() {
    let dir = tempfile::tempdir().unwrap();
    let device = Vsock::new(42, &dir.path().join("v.sock")).unwrap();
    let mut cid = [0u8; 8];
    device.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 42);
    assert_eq!(device.device_type(), 19);
    assert_eq!(device.queue_max_sizes().len(), 3);
    assert_eq!(device.queue_events().len(), 3);
}

/// Built into a VM, the device is announced on the command line, its queue
/// notifications become ioeventfds at QueueNotify with the queue index as
/// datamatch, and its socket file goes away with the VM.
#[test]
fn a_vm_with_vsock_registers_ioeventfds_and_announces_the_device() {
    use vmrun_vmm::arch::layout::{CMDLINE_START, VIRTIO_MMIO_START};
    use vmrun_vmm::config::{VmConfig, VsockConfig};
    use vmrun_vmm::hypervisor::fake::FakeHypervisor;
    use vmrun_vmm::hypervisor::IoEventAddress;
    use vmrun_vmm::vm::MicroVm;

    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let (_k, kernel) = support::temp_file(&support::elf_image(support::guests::PVH_HELLO, true));
    let (_d, disk) = support::temp_file(&[0u8; 4096]);
    let mut config = VmConfig::new(&kernel);
    config.memory_mib = 64;
    config.disks = vec![vmrun_vmm::config::DiskConfig {
        path: disk,
        read_only: false,
    }];
    config.vsock = Some(VsockConfig {
        guest_cid: 9,
        uds_path: uds.clone(),
    });
    let hypervisor = FakeHypervisor::new();
    let vm = MicroVm::build(&hypervisor, &config, Box::new(std::io::sink())).unwrap();
    let notify = VIRTIO_MMIO_START + 0x1000 + 0x50;
    assert_eq!(
        hypervisor.record().ioevents,
        (0..3)
            .map(|q| (IoEventAddress::Mmio(notify), Some(q)))
            .collect::<Vec<_>>(),
        "the disk (slot 0) has none; vsock (slot 1) one per queue"
    );
    let mut cmdline = vec![0u8; 256];
    vm.memory()
        .read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
        .unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(
        cmdline.contains("virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"),
        "{cmdline}"
    );
    assert!(uds.exists());
    drop(vm);
    assert!(!uds.exists(), "the socket file goes with the VM");
}
