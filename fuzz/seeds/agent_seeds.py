#!/usr/bin/env python3
"""Writes the seeds of the agent_requests target: a kind byte, then the
protobuf request (hand-encoded here) as the host sends it. Seeds named
bad-* are requests the agent must refuse. Run from the repository root."""
import os


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, value):
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


def write(name, kind, message):
    os.makedirs("fuzz/seeds/agent_requests", exist_ok=True)
    with open(f"fuzz/seeds/agent_requests/{name}", "wb") as f:
        f.write(bytes([kind]) + message)


eth0 = field(1, "eth0") + field(2, "0a:58:0a:58:00:05") + field(3, 1500) + field(4, "10.88.0.5/16") + field(4, "fd00::5/64")
write("configure-network", 0, field(1, eth0) + field(2, field(1, "default") + field(2, "10.88.0.1") + field(3, "eth0")))
write("bad-network-route-device", 0, field(1, eth0) + field(2, field(1, "default") + field(3, "eth1")))
write("bad-network-mac", 0, field(1, field(1, "eth0") + field(2, "01:00:5e:00:00:01")))
write("copy-file", 1, field(1, "volumes/config/app.conf") + field(2, 0o644) + field(3, "key=value\n"))
write("bad-copy-file-dotdot", 1, field(1, "volumes/../../etc/passwd") + field(3, "x"))
write("bad-copy-file-absolute", 1, field(1, "/etc/passwd"))
spec = '{"ociVersion":"1.0.2","process":{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0}},"root":{"path":"rootfs"},"mounts":[{"destination":"/proc","type":"proc","source":"/run/vmrun/procview/proc/meminfo"}]}'
write("create-container", 2, field(1, "c1") + field(2, spec) + field(3, field(1, "/dev/vdb") + field(2, "ext4") + field(3, "layers/0") + field(3, "layers/1")))
write("bad-create-container-layer", 2, field(1, "c1") + field(2, spec) + field(3, field(1, "/dev/vdb") + field(3, "../../etc")))
write("bad-create-container-id", 2, field(1, "../c1") + field(2, spec))
sysctl = lambda k, v: field(5, field(1, k) + field(2, v))
write("create-sandbox", 3, field(1, "pod-1") + sysctl("net.ipv4.ip_unprivileged_port_start", "0") + sysctl("kernel.shm_rmid_forced", "1"))
write("bad-create-sandbox-sysctl", 3, field(1, "pod-1") + sysctl("net/../../../etc/passwd", "0"))
write("exec", 4, field(1, "c1") + field(2, "exec-1") + field(3, '{"cwd":"/","args":["ls","-l"],"env":["A=b"],"user":{"uid":0,"gid":0}}'))
write("update-resources", 5, field(1, "c1") + field(2, '{"memory":{"limit":67108864},"cpu":{"quota":50000,"period":100000}}'))
