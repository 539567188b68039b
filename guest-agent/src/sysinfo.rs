//! Facts about the guest reported by `Health`.

use vmrun_proto::v1::HealthResponse;

/// CLOCK_BOOTTIME in nanoseconds: time since the guest kernel started,
/// including suspend. Taken by `main` as its first action.
pub fn boottime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn online_cpus() -> u32 {
    // SAFETY: sysconf only reads a system value; no pointers are involved.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(n).unwrap_or(0)
}

/// MemTotal from a /proc/meminfo text, in bytes.
pub(crate) fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => Some(value * 1024),
        None => Some(value),
        Some(_) => None,
    }
}

pub(crate) fn health(boot_timestamp_ns: u64) -> HealthResponse {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    HealthResponse {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        protocol_version: vmrun_proto::PROTOCOL_VERSION,
        boot_timestamp_ns,
        kernel_release: kernel_release(),
        num_cpus: online_cpus(),
        mem_total_bytes: parse_mem_total(&meminfo).unwrap_or(0),
        protocol_revision: vmrun_proto::PROTOCOL_REVISION,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_converted_from_kib() {
        let text = "MemTotal:        2030592 kB\nMemFree:          100 kB\n";
        assert_eq!(parse_mem_total(text), Some(2030592 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 12 MB\n"), None);
    }

    #[test]
    fn boottime_advances() {
        let a = boottime_ns();
        assert!(a > 0);
        assert!(boottime_ns() >= a);
    }
}
