#!/usr/bin/env python3
"""Writes the seed inputs of the virtio_* targets (the script format that
vmm/src/fuzzing.rs reads): a guest driver doing things right, which the
fuzzer then bends. Run from the repository root: fuzz/seeds/virtio_seeds.py"""
import os
import struct

DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000


def queue(exp, base=0, event_idx=0):
    # size exponent, desc/avail/used addresses (halved), event_idx
    return struct.pack("<BHHHB", exp, (DESC + base) // 2, (AVAIL + base) // 2,
                       (USED + base) // 2, event_idx)


def desc(q, slot, addr, length, flags, nxt):
    return struct.pack("<BBHBIIHH", 0, q, slot, 0, addr, length, flags, nxt)


def avail(q, head):
    return struct.pack("<BBH", 1, q, head)


def patch(q, addr, data):
    return struct.pack("<BBHB", 3, q, addr // 2, len(data)) + data


def notify(q):
    return struct.pack("<BB", 4, q)


NEXT, WRITE = 1, 2


def write(target, name, data):
    os.makedirs(f"fuzz/seeds/{target}", exist_ok=True)
    with open(f"fuzz/seeds/{target}/{name}", "wb") as f:
        f.write(data)


def blk_request(kind, sector, data_len, data_flags):
    header = struct.pack("<IIQ", kind, 0, sector)
    s = desc(0, 0, 0x4000, 16, NEXT, 1)
    if data_len:
        s += desc(0, 1, 0x5000, data_len, NEXT | data_flags, 2)
        s += desc(0, 2, 0x6000, 1, WRITE, 0)
    else:
        s += desc(0, 1, 0x6000, 1, WRITE, 0)
    return s + patch(0, 0x4000, header) + avail(0, 0) + notify(0)


# virtio_block: mode (bit0 read-only, bit1 empty slot), features, queue, ops.
blk = b"\x00" + struct.pack("<Q", 1 << 32) + queue(4)
write("virtio_block", "read", blk + blk_request(0, 1, 1024, WRITE))
write("virtio_block", "write", blk + blk_request(1, 2, 512, 0) + blk_request(0, 2, 512, WRITE))
write("virtio_block", "flush-get-id", blk + blk_request(4, 0, 0, 0) + blk_request(8, 0, 20, WRITE))
write("virtio_block", "loop", blk + desc(0, 0, 0x4000, 16, NEXT, 0) + avail(0, 0) + notify(0))
write("virtio_block", "empty-slot-filled",
      b"\x02" + struct.pack("<Q", 1 << 32) + queue(4) + blk_request(0, 0, 512, WRITE)
      + b"\x05" + blk_request(0, 0, 512, WRITE))

# virtio_balloon: reporting offered, features, 2 or 3 queues, ops.
bal = b"\x01" + struct.pack("<Q", (1 << 32) | (1 << 5)) + queue(4, 0) + queue(4, 0x400) + queue(4, 0x800)
pfns = struct.pack("<4I", 0x10, 0x11, 0x12, 0x20)
write("virtio_balloon", "inflate",
      bal + desc(0, 0, 0x5000, 16, 0, 0) + patch(0, 0x5000, pfns) + avail(0, 0) + notify(0))
write("virtio_balloon", "report",
      bal + desc(2, 0, 0xa000, 0x2000, WRITE, 0) + avail(2, 0) + notify(2)
      + b"\x05\x04\x04" + struct.pack("<I", 4))
write("virtio_balloon", "deflate", bal + desc(1, 0, 0x5000, 8, 0, 0) + avail(1, 0) + notify(1))

# virtio_net: rx and tx queues, ops; 5 = frame from the host, 6 = next send result.
net = queue(4, 0) + queue(4, 0x400)
frame = bytes(range(60))
write("virtio_net", "tx",
      net + desc(1, 0, 0x5000, 12, NEXT, 1) + desc(1, 1, 0x6000, 60, 0, 0)
      + patch(1, 0x6000, frame) + avail(1, 0) + notify(1))
write("virtio_net", "rx",
      net + desc(0, 0, 0x5000, 2048, WRITE, 0) + avail(0, 0)
      + b"\x05" + struct.pack("<HB", 60, 0) + frame[:16] + notify(0))
write("virtio_net", "tx-would-block",
      net + b"\x06\x01" + desc(1, 0, 0x5000, 74, 0, 0) + avail(1, 0) + notify(1)
      + b"\x07" + struct.pack("<I", 4) + notify(1))


def vsock_header(src_cid, dst_cid, src_port, dst_port, length, op, buf_alloc=65536):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, length, 1, op, 0,
                       buf_alloc, 0)


# virtio_vsock: rx, tx, event queues; 5 = host client connects, 6 = host end does something.
vs = queue(4, 0) + queue(4, 0x400) + queue(4, 0x800)
rx_buffers = b"".join(desc(0, i, 0x8000 - 0x1000 + i * 0x100, 0x100, WRITE, 0) + avail(0, i)
                      for i in range(4))
request = vsock_header(3, 2, 5000, 1024, 0, 1)
data = vsock_header(3, 2, 5000, 1024, 5, 5) + b"hello"
write("virtio_vsock", "guest-connect",
      vs + rx_buffers + desc(1, 0, 0x5000, 44, 0, 0) + patch(1, 0x5000, request)
      + avail(1, 0) + notify(1) + b"\x05"
      + desc(1, 1, 0x5100, 49, 0, 0) + patch(1, 0x5100, data) + avail(1, 1) + notify(1)
      + b"\x06\x00\x02")
write("virtio_vsock", "host-connect",
      vs + rx_buffers + b"\x05" + b"\x06\x00\x00" + struct.pack("<H", 52) + notify(0)
      + b"\x06\x00\x01\x05hello" + notify(0))
write("virtio_vsock", "rst", vs + rx_buffers + desc(1, 0, 0x5000, 44, 0, 0)
      + patch(1, 0x5000, vsock_header(3, 2, 7, 99, 0, 1)) + avail(1, 0) + notify(1))


# virtio_mmio: device (0 block, 1 balloon, 2 balloon with reporting), accesses.
def mw(offset, value):
    return struct.pack("<BBQ", 0, offset, value)


def mr(offset):
    return struct.pack("<BB", 4, offset)


def mpatch(addr, data):
    return struct.pack("<BHB", 6, addr // 2, len(data)) + data


def setup(queues):
    s = mw(0x70, 0) + mw(0x70, 1) + mw(0x70, 3) + mr(0x00) + mr(0x10)
    s += mw(0x24, 1) + mw(0x20, 1) + mw(0x24, 0) + mw(0x20, 0) + mw(0x70, 11) + mr(0x70)
    for q in range(queues):
        base = q * 0x400
        s += mw(0x30, q) + mr(0x34) + mw(0x38, 16)
        s += mw(0x80, DESC + base) + mw(0x84, 0) + mw(0x90, AVAIL + base) + mw(0x94, 0)
        s += mw(0xa0, USED + base) + mw(0xa4, 0) + mw(0x44, 1)
    return s + mw(0x70, 15)


def mdesc(slot, addr, length, flags, nxt):
    return mpatch(DESC + slot * 16, struct.pack("<QIHH", addr, length, flags, nxt))


blk_chain = (mdesc(0, 0x4000, 16, NEXT, 1) + mdesc(1, 0x5000, 512, NEXT | WRITE, 2)
             + mdesc(2, 0x6000, 1, WRITE, 0) + mpatch(0x4000, struct.pack("<IIQ", 0, 0, 1))
             + mpatch(AVAIL, struct.pack("<HHH", 0, 1, 0)) + mw(0x50, 0) + mr(0x60) + mw(0x64, 1))
write("virtio_mmio", "block", b"\x00" + setup(1) + blk_chain + struct.pack("<BB", 0x44, 0) + mw(0x70, 0))
write("virtio_mmio", "balloon", b"\x01" + setup(2) + struct.pack("<BBQ", 0x40, 4, 7)
      + struct.pack("<BB", 0x44, 4))
