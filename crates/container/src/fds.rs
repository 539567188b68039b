//! File-descriptor plumbing for the forked children.

use std::io;
use std::os::fd::RawFd;

fn close_range(first: u32, last: u32) -> io::Result<()> {
    // SAFETY: close_range only closes descriptors; the caller guarantees no
    // live Rust object in this (forked) process relies on the closed ones.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Closes every descriptor >= 3 except `keep`. Called first thing in a
/// forked child: the caller is multi-threaded, so the child inherited every
/// fd other threads had open at fork time, including other containers'
/// channel ends, whose EOF would otherwise be delayed.
pub(crate) fn close_fds_except(keep: &[RawFd]) -> io::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|f| **f >= 3)
        .map(|f| *f as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut next = 3u32;
    let mut ranges = Vec::with_capacity(keep.len() + 1);
    for k in keep {
        if k > next {
            ranges.push((next, k - 1));
        }
        next = k + 1;
    }
    ranges.push((next, u32::MAX));
    for (a, b) in &ranges {
        if let Err(e) = close_range(*a, *b) {
            if e.raw_os_error() != Some(libc::ENOSYS) {
                return Err(e);
            }
            return close_by_listing(&ranges);
        }
    }
    Ok(())
}

/// Fallback for kernels without close_range (< 5.9).
fn close_by_listing(ranges: &[(u32, u32)]) -> io::Result<()> {
    let open: Vec<u32> = std::fs::read_dir("/proc/self/fd")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open {
        if ranges.iter().any(|(a, b)| fd >= *a && fd <= *b) {
            // SAFETY: see close_range above.
            unsafe { libc::close(fd as RawFd) };
        }
    }
    Ok(())
}

/// Puts `src[i]` on descriptor i (0, 1, 2). Sources are first duplicated
/// above 2 so a source that is itself 0..2 is not clobbered midway.
pub(crate) fn install_stdio(src: [RawFd; 3]) -> io::Result<()> {
    let mut high = [0 as RawFd; 3];
    for (i, fd) in src.iter().enumerate() {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor number has no memory
        // safety requirements; failure is reported through the return value.
        let d = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10) };
        if d < 0 {
            return Err(io::Error::last_os_error());
        }
        high[i] = d;
    }
    for (i, fd) in high.iter().enumerate() {
        // SAFETY: dup2 onto 0..2 replaces the standard descriptors, which no
        // Rust object in the child owns.
        if unsafe { libc::dup2(*fd, i as RawFd) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
