//! What a virtio-blk device serves: a disk image file, or nothing yet.
//!
//! A block device made with a [`MediaSlot`] of its own can be given its
//! disk after the guest booted (CRI creates a pod VM before it knows the
//! images of its containers). The slot starts empty (capacity 0); filling
//! it changes the capacity in the configuration space, bumps the
//! configuration generation and raises the configuration-change interrupt,
//! so the guest driver re-reads the capacity (Linux virtio_blk resizes the
//! disk) and the disk can be mounted. A filled slot is never emptied while
//! the guest runs: the guest may hold the disk's data in its page cache.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use super::block_request::SECTOR_SIZE;
use super::VirtioInterrupt;

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("disk image {path} was passed open read-only but is to be written")]
    NotWritable { path: PathBuf },
    #[error("disk image {path} is not a regular file or block device")]
    NotADisk { path: PathBuf },
    #[error("disk image {path} is empty (a disk needs at least one 512-byte sector)")]
    Empty { path: PathBuf },
    #[error("this disk slot already holds {0}")]
    Full(PathBuf),
}

/// An open disk image.
pub struct Media {
    pub(super) file: File,
    pub(super) read_only: bool,
    /// In 512-byte sectors; a trailing partial sector is not addressable.
    pub(super) capacity: u64,
    path: PathBuf,
}

impl Media {
    /// Opens `path` (a regular file or a block device).
    pub fn open(path: &Path, read_only: bool) -> Result<Media, MediaError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| MediaError::Open {
                path: path.to_owned(),
                source,
            })?;
        Media::from_file(file, path, read_only)
    }

    /// A disk the host opened (a jailed VMM cannot open host paths);
    /// `path` names it in messages. A writable disk needs a file opened
    /// for writing.
    pub fn from_file(file: File, path: &Path, read_only: bool) -> Result<Media, MediaError> {
        let open_error = |source| MediaError::Open {
            path: path.to_owned(),
            source,
        };
        if !read_only {
            // SAFETY: F_GETFL only reads the flags of an fd `file` owns.
            let flags =
                unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_GETFL) };
            if flags < 0 {
                return Err(open_error(io::Error::last_os_error()));
            }
            if flags & libc::O_ACCMODE != libc::O_RDWR {
                return Err(MediaError::NotWritable {
                    path: path.to_owned(),
                });
            }
        }
        let meta = file.metadata().map_err(open_error)?;
        use std::os::unix::fs::FileTypeExt;
        let size = if meta.file_type().is_block_device() {
            // A block device's metadata says 0: its size is where it ends.
            use std::io::Seek;
            (&file).seek(io::SeekFrom::End(0)).map_err(open_error)?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(MediaError::NotADisk {
                path: path.to_owned(),
            });
        };
        Ok(Media {
            file,
            read_only,
            capacity: size / SECTOR_SIZE,
            path: path.to_owned(),
        })
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The disk a block device serves, shared between the device (on the vCPU
/// thread) and whoever fills the slot (the VM's owner thread).
#[derive(Default)]
pub struct MediaSlot {
    media: Mutex<Option<Arc<Media>>>,
    /// Added to the transport's configuration generation: the capacity
    /// changes outside any driver write.
    generation: AtomicU32,
    /// The device's interrupt while the driver has it activated.
    interrupt: Mutex<Option<Arc<VirtioInterrupt>>>,
}

impl MediaSlot {
    pub fn with(media: Media) -> Arc<MediaSlot> {
        Arc::new(MediaSlot {
            media: Mutex::new(Some(Arc::new(media))),
            ..MediaSlot::default()
        })
    }

    pub fn empty() -> Arc<MediaSlot> {
        Arc::new(MediaSlot::default())
    }

    /// The disk now served, if any.
    pub fn current(&self) -> Option<Arc<Media>> {
        self.media.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn is_empty(&self) -> bool {
        self.current().is_none()
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.current().map_or(0, |m| m.capacity)
    }

    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::Acquire)
    }

    /// Puts `media` in the empty slot and tells an active driver.
    pub fn fill(&self, media: Media) -> Result<(), MediaError> {
        if media.capacity == 0 {
            return Err(MediaError::Empty { path: media.path });
        }
        {
            let mut slot = self.media.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(held) = slot.as_ref() {
                return Err(MediaError::Full(held.path.clone()));
            }
            *slot = Some(Arc::new(media));
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        // A driver not yet active reads the capacity when it probes.
        let interrupt = self
            .interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(interrupt) = interrupt {
            // The guest re-reads the configuration on its next interrupt at
            // the latest; a failed eventfd write cannot be retried usefully.
            let _ = interrupt.signal_config_change();
        }
        Ok(())
    }

    pub(super) fn set_interrupt(&self, interrupt: Option<Arc<VirtioInterrupt>>) {
        *self.interrupt.lock().unwrap_or_else(|p| p.into_inner()) = interrupt;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(sectors: usize) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&vec![7u8; sectors * 512 + 100]).unwrap();
        file
    }

    #[test]
    fn an_empty_slot_has_no_capacity_until_filled_once() {
        let slot = MediaSlot::empty();
        assert!(slot.is_empty());
        assert_eq!((slot.capacity_sectors(), slot.generation()), (0, 0));
        let disk = image(3);
        slot.fill(Media::open(disk.path(), true).unwrap()).unwrap();
        assert_eq!((slot.capacity_sectors(), slot.generation()), (3, 1));
        let again = slot.fill(Media::open(disk.path(), true).unwrap());
        assert!(matches!(again, Err(MediaError::Full(p)) if p == disk.path()));
        assert_eq!(slot.generation(), 1);
    }

    #[test]
    fn a_disk_without_a_whole_sector_is_refused() {
        let slot = MediaSlot::empty();
        let disk = image(0);
        let err = slot
            .fill(Media::open(disk.path(), true).unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
        assert!(slot.is_empty());
    }

    #[test]
    fn filling_an_active_slot_raises_the_config_interrupt() {
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
        let slot = MediaSlot::empty();
        slot.set_interrupt(Some(interrupt.clone()));
        let disk = image(1);
        slot.fill(Media::open(disk.path(), true).unwrap()).unwrap();
        assert_eq!(
            interrupt.status(),
            virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(irq.read().unwrap(), 1);
    }

    #[test]
    fn what_is_not_a_disk_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = Media::open(dir.path(), true).err().unwrap().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let err = Media::open(&dir.path().join("nope"), true)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("cannot open disk image"), "{err}");
    }
}
