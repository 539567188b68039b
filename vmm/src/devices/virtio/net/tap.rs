//! The device's network backend: a [`NetBackend`] moves whole Ethernet
//! frames. [`Tap`] is a Linux tap device, opened by name through
//! `/dev/net/tun` or taken over from an inherited file descriptor; a
//! datagram socket pair serves as a backend for tests.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;

use super::chain::VNET_HDR_SIZE;

/// Where frames go to and come from.
///
/// The fd of [`AsRawFd`] is what the device thread waits on: readable
/// when a frame waits, writable when [`NetBackend::send`] can go on. The
/// device registers it edge-triggered and keeps reading or writing until
/// `WouldBlock`, so both calls must be non-blocking.
pub trait NetBackend: AsRawFd + Send {
    /// Sends one Ethernet frame. `WouldBlock` when the backend cannot take
    /// it now (the device retries when the fd turns writable); any other
    /// error drops the frame.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Receives one frame into `buf`; its length, or `WouldBlock` when
    /// none waits. 0 means the backend is gone: no frame will come.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// A connected datagram socket (one of a `socketpair`) carries one frame
/// per datagram; for tests, or a userspace switch. Must be non-blocking.
impl NetBackend for UnixDatagram {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        UnixDatagram::send(self, frame).map(|_| ())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        UnixDatagram::recv(self, buf)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid tap device name {0:?}: 1 to 15 bytes, no '/', ':' or whitespace")]
    Name(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error(
        "cannot create or attach tap device {name}: {source} \
         (creating one needs CAP_NET_ADMIN; an existing one must be a tap owned by this user, \
         not in use, created without multi-queue)"
    )]
    Attach { name: String, source: io::Error },
    #[error("cannot set the virtio-net header size of tap device {name}: {source}")]
    VnetHeader { name: String, source: io::Error },
    #[error("file descriptor {fd}: {source}")]
    Fd { fd: RawFd, source: io::Error },
    #[error("file descriptor {fd} is not an attached tap device: {source}")]
    NotATap { fd: RawFd, source: io::Error },
    #[error("file descriptor {fd} is a tun or packet-info device (flags {flags:#x}); a tap with IFF_NO_PI is needed")]
    WrongKind { fd: RawFd, flags: i32 },
}

/// struct ifreq with the `ifr_flags` member of its union (40 bytes).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_int) -> IfReq {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: flags as libc::c_short,
            _pad: [0; 22],
        };
        // The caller checked the length: the last byte stays NUL.
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }

    fn name(&self) -> String {
        CStr::from_bytes_until_nul(&self.name)
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Whether the kernel accepts `name` as a network interface name
/// (`dev_valid_name`); a `%d` in it makes the kernel pick a number.
pub fn valid_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

/// A tap device in `IFF_TAP | IFF_NO_PI` mode, normally with
/// `IFF_VNET_HDR` (header size 12, virtio_net_hdr_v1): frames are read and
/// written with that header in front, which [`NetBackend`] hides.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    vnet_hdr: bool,
}

impl Tap {
    /// Creates the tap device `name`, or attaches to the existing one.
    /// A tap the VMM created goes away when the VMM closes it.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_interface_name(name) {
            return Err(TapError::Name(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::new(name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `req`
        // is (40 bytes, repr(C)); `file` is an open tun fd.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Attach {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        let name = req.name();
        set_vnet_hdr_size(&file).map_err(|source| TapError::VnetHeader {
            name: name.clone(),
            source,
        })?;
        Ok(Tap {
            file,
            name,
            vnet_hdr: true,
        })
    }

    /// Uses the tap device open as `fd` (inherited from whoever started
    /// the VMM, who keeps that fd): the device works on a duplicate. The
    /// open file is made non-blocking, which the original shares. With
    /// `IFF_VNET_HDR` the header size is set to 12; without, frames are
    /// read and written bare.
    pub fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        let fd_error = |source| TapError::Fd { fd, source };
        // SAFETY: F_DUPFD_CLOEXEC only creates a new descriptor; an invalid
        // `fd` makes it fail with EBADF.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            return Err(fd_error(io::Error::last_os_error()));
        }
        // SAFETY: `dup` was just created and nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(dup) });
        let mut req = IfReq::new("", 0);
        // SAFETY: TUNGETIFF writes one struct ifreq, which `req` is; on a
        // file that is not a tun device it fails (ENOTTY, EBADFD).
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut req) } < 0 {
            return Err(TapError::NotATap {
                fd,
                source: io::Error::last_os_error(),
            });
        }
        let flags = i32::from(req.flags) & 0xffff;
        if flags & libc::IFF_TAP == 0 || flags & libc::IFF_NO_PI == 0 {
            return Err(TapError::WrongKind { fd, flags });
        }
        let vnet_hdr = flags & libc::IFF_VNET_HDR != 0;
        let name = req.name();
        if vnet_hdr {
            set_vnet_hdr_size(&file).map_err(|source| TapError::VnetHeader {
                name: name.clone(),
                source,
            })?;
        }
        // SAFETY: F_GETFL only reads the flags of our own open descriptor.
        let status = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if status < 0 {
            return Err(fd_error(io::Error::last_os_error()));
        }
        // SAFETY: F_SETFL only sets file status flags of our descriptor.
        let set =
            unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, status | libc::O_NONBLOCK) };
        if set < 0 {
            return Err(fd_error(io::Error::last_os_error()));
        }
        Ok(Tap {
            file,
            name,
            vnet_hdr,
        })
    }

    /// The interface's name (what the kernel made of a `%d` in it).
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn set_vnet_hdr_size(file: &File) -> io::Result<()> {
    let size = VNET_HDR_SIZE as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int, which `size` is.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // No offloads are negotiated, so the header is all zeros: no
        // checksum to fill in, no segmentation (the guest's header, which
        // could only say the same, is not passed on).
        let header = [0u8; VNET_HDR_SIZE];
        let parts: &[&[u8]] = if self.vnet_hdr {
            &[&header, frame]
        } else {
            &[frame]
        };
        let iovecs: Vec<libc::iovec> = parts
            .iter()
            .map(|part| libc::iovec {
                iov_base: part.as_ptr() as *mut libc::c_void,
                iov_len: part.len(),
            })
            .collect();
        // SAFETY: every iovec points into a live slice of its length; the
        // kernel only reads them.
        let n = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // The header the tap gives (no offloads: nothing in it the guest
        // needs) is read and dropped; the device writes its own.
        let mut header = [0u8; VNET_HDR_SIZE];
        let mut iovecs = Vec::with_capacity(2);
        if self.vnet_hdr {
            iovecs.push(libc::iovec {
                iov_base: header.as_mut_ptr().cast(),
                iov_len: header.len(),
            });
        }
        iovecs.push(libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        });
        // SAFETY: every iovec points into a live, exclusively borrowed
        // buffer of its length.
        let n = unsafe {
            libc::readv(
                self.file.as_raw_fd(),
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let header_len = if self.vnet_hdr { VNET_HDR_SIZE } else { 0 };
        match (n as usize).checked_sub(header_len) {
            // A tap never hands out an empty frame; 0 would read as "gone".
            Some(0) | None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the tap returned a frame shorter than its header",
            )),
            Some(len) => Ok(len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_follow_the_kernel_rules() {
        for good in ["tap0", "vmrun-net.1", "tap%d", "a", "x".repeat(15).as_str()] {
            assert!(valid_interface_name(good), "{good:?}");
        }
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "x".repeat(16).as_str()] {
            assert!(!valid_interface_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn ifreq_is_the_kernel_size() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(IfReq::new("tap0", 0).name(), "tap0");
    }

    #[test]
    fn a_non_tap_fd_is_refused() {
        let file = File::open("/dev/null").unwrap();
        assert!(matches!(
            Tap::from_fd(file.as_raw_fd()),
            Err(TapError::NotATap { .. })
        ));
        assert!(matches!(Tap::from_fd(-1), Err(TapError::Fd { .. })));
        assert!(matches!(Tap::open("a/b"), Err(TapError::Name(_))));
    }
}
