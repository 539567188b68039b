//! `vmrun-guest-check`: PID 1 of test guests (a static musl binary as `/init`).
//!
//! It prints what the guest sees as `CHECK key=value` lines on the console and
//! does what the kernel command line asks, then powers off (reboot, which
//! vmrun-vmm treats as a clean stop):
//!
//! - always: `CHECK cpus=N` (online CPUs) and `CHECK mem_kib=N` (MemTotal);
//! - `check.disk`: reads the first line of /dev/vda (`CHECK disk_read=...`)
//!   and writes `written by the guest\n` at byte 4096, then syncs;
//! - `check.connect=PORT`: connects to the host (CID 2) on vsock PORT, sends
//!   `hello from the guest\n`, prints the reply line (`CHECK connect_reply=...`);
//! - `check.listen=PORT`: listens on vsock PORT, prints `CHECK listening=PORT`,
//!   answers one connection's line with `echo: LINE` (`CHECK listen_got=...`);
//! - `check.panic`: exits, so the kernel panics ("Attempted to kill init").
//!
//! Any failure prints `CHECK error=...` and still powers off: the test reads
//! the console and the VMM's exit status.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::sys::socket::{
    accept, bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

const HOST_CID: u32 = 2;

fn main() {
    if let Err(e) = run() {
        println!("CHECK error={e}");
    }
    let _ = std::io::stdout().flush();
    nix::unistd::sync();
    if std::process::id() == 1 {
        // Never returns on success; a PID 1 that exits would panic the kernel.
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    }
}

fn run() -> Result<(), String> {
    if std::process::id() == 1 {
        mount_pseudo_filesystems();
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("cmdline: {e}"))?;
    let arg = |key: &str| {
        cmdline.split_whitespace().find_map(|w| {
            let rest = w.strip_prefix(key)?;
            match rest.strip_prefix('=') {
                Some(value) => Some(value.to_string()),
                None if rest.is_empty() => Some(String::new()),
                None => None,
            }
        })
    };
    println!("CHECK cpus={}", online_cpus()?);
    println!("CHECK mem_kib={}", mem_total_kib()?);
    if arg("check.disk").is_some() {
        disk()?;
    }
    if let Some(port) = arg("check.listen") {
        listen_once(parse_port(&port)?)?;
    }
    if let Some(port) = arg("check.connect") {
        connect_host(parse_port(&port)?)?;
    }
    if arg("check.panic").is_some() {
        println!("CHECK panicking=1");
        let _ = std::io::stdout().flush();
        // The console driver sends what is written from its interrupt, and
        // the panic that init's exit causes does not wait for it: drain the
        // terminal first, or a slow (nested) guest loses these lines.
        let _ = nix::sys::termios::tcdrain(std::io::stdout());
        std::process::exit(3);
    }
    println!("CHECK done=1");
    Ok(())
}

fn mount_pseudo_filesystems() {
    use nix::mount::{mount, MsFlags};
    for (fstype, target) in [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")] {
        let _ = std::fs::create_dir_all(target);
        // Already mounted (devtmpfs automount) is fine.
        let _ = mount(
            Some(fstype),
            target,
            Some(fstype),
            MsFlags::empty(),
            None::<&str>,
        );
    }
}

fn parse_port(s: &str) -> Result<u32, String> {
    s.parse().map_err(|_| format!("bad vsock port {s:?}"))
}

fn online_cpus() -> Result<usize, String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").map_err(|e| format!("cpuinfo: {e}"))?;
    Ok(text.lines().filter(|l| l.starts_with("processor")).count())
}

fn mem_total_kib() -> Result<u64, String> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("meminfo: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| "no MemTotal in /proc/meminfo".to_string())
}

fn disk() -> Result<(), String> {
    let err = |e: std::io::Error| format!("/dev/vda: {e}");
    let mut disk = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vda")
        .map_err(err)?;
    let mut first = [0u8; 512];
    disk.read_exact(&mut first).map_err(err)?;
    let line = first.split(|&b| b == b'\n').next().unwrap_or_default();
    println!("CHECK disk_read={}", String::from_utf8_lossy(line));
    disk.seek(SeekFrom::Start(4096)).map_err(err)?;
    disk.write_all(b"written by the guest\n").map_err(err)?;
    disk.sync_all().map_err(err)?;
    println!("CHECK disk_written=1");
    Ok(())
}

fn vsock_socket() -> Result<OwnedFd, String> {
    socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("vsock socket: {e}"))
}

/// Wraps a connected socket as a file for line I/O.
fn stream(fd: OwnedFd) -> File {
    File::from(fd)
}

fn connect_host(port: u32) -> Result<(), String> {
    let fd = vsock_socket()?;
    connect(fd.as_raw_fd(), &VsockAddr::new(HOST_CID, port))
        .map_err(|e| format!("vsock connect to host port {port}: {e}"))?;
    let mut conn = stream(fd);
    conn.write_all(b"hello from the guest\n")
        .map_err(|e| format!("vsock write: {e}"))?;
    let mut reply = String::new();
    BufReader::new(&conn)
        .read_line(&mut reply)
        .map_err(|e| format!("vsock read: {e}"))?;
    println!("CHECK connect_reply={}", reply.trim_end());
    Ok(())
}

fn listen_once(port: u32) -> Result<(), String> {
    let fd = vsock_socket()?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc_vmaddr_cid_any(), port))
        .map_err(|e| format!("vsock bind port {port}: {e}"))?;
    listen(&fd, Backlog::new(1).map_err(|e| e.to_string())?)
        .map_err(|e| format!("vsock listen: {e}"))?;
    println!("CHECK listening={port}");
    let _ = std::io::stdout().flush();
    let raw = accept(fd.as_raw_fd()).map_err(|e| format!("vsock accept: {e}"))?;
    // SAFETY: accept(2) returned a new descriptor that nothing else owns.
    let conn = stream(unsafe { OwnedFd::from_raw_fd(raw) });
    let mut line = String::new();
    BufReader::new(&conn)
        .read_line(&mut line)
        .map_err(|e| format!("vsock read: {e}"))?;
    let line = line.trim_end().to_string();
    (&conn)
        .write_all(format!("echo: {line}\n").as_bytes())
        .map_err(|e| format!("vsock write: {e}"))?;
    println!("CHECK listen_got={line}");
    Ok(())
}

/// VMADDR_CID_ANY: accept connections addressed to any of the guest's CIDs.
fn libc_vmaddr_cid_any() -> u32 {
    u32::MAX
}
