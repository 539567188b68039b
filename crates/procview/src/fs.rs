//! The FUSE filesystem: one flat directory of read-only files, each rendered
//! for the process that opens it. Content is fixed at open (as procfs fixes
//! it at the first read), so a reader paging through it sees one snapshot;
//! a read on a handle this process did not open (the worker restarted under
//! an open file) renders afresh.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    consts::FOPEN_DIRECT_IO, FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, Request, FUSE_ROOT_ID,
};

use crate::loadavg::Loads;
use crate::render;
use crate::view::{clock_ticks, Needs, Roots};

/// The files served, their inode numbers, and where a container sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewFile {
    Meminfo,
    Cpuinfo,
    Stat,
    Loadavg,
    Uptime,
    Swaps,
    CpuOnline,
}

impl ViewFile {
    pub const ALL: [ViewFile; 7] = [
        ViewFile::Meminfo,
        ViewFile::Cpuinfo,
        ViewFile::Stat,
        ViewFile::Loadavg,
        ViewFile::Uptime,
        ViewFile::Swaps,
        ViewFile::CpuOnline,
    ];

    /// Its name in the filesystem.
    pub fn name(self) -> &'static str {
        match self {
            ViewFile::Meminfo => "meminfo",
            ViewFile::Cpuinfo => "cpuinfo",
            ViewFile::Stat => "stat",
            ViewFile::Loadavg => "loadavg",
            ViewFile::Uptime => "uptime",
            ViewFile::Swaps => "swaps",
            ViewFile::CpuOnline => "cpu-online",
        }
    }

    /// The file of the container it is bind-mounted over.
    pub fn container_path(self) -> &'static str {
        match self {
            ViewFile::Meminfo => "/proc/meminfo",
            ViewFile::Cpuinfo => "/proc/cpuinfo",
            ViewFile::Stat => "/proc/stat",
            ViewFile::Loadavg => "/proc/loadavg",
            ViewFile::Uptime => "/proc/uptime",
            ViewFile::Swaps => "/proc/swaps",
            ViewFile::CpuOnline => "/sys/devices/system/cpu/online",
        }
    }

    /// What rendering it reads about the container.
    fn needs(self) -> Needs {
        let none = Needs {
            memory: false,
            cpus: false,
            cpu_time: false,
            tasks: false,
        };
        match self {
            ViewFile::Meminfo | ViewFile::Swaps => Needs {
                memory: true,
                ..none
            },
            ViewFile::Cpuinfo | ViewFile::CpuOnline => Needs { cpus: true, ..none },
            ViewFile::Loadavg => Needs {
                tasks: true,
                ..none
            },
            ViewFile::Stat | ViewFile::Uptime => Needs {
                cpus: true,
                cpu_time: true,
                tasks: true,
                ..none
            },
        }
    }

    fn ino(self) -> u64 {
        FUSE_ROOT_ID + 1 + Self::ALL.iter().position(|f| *f == self).unwrap_or(0) as u64
    }

    fn from_ino(ino: u64) -> Option<ViewFile> {
        Self::ALL.iter().copied().find(|f| f.ino() == ino)
    }
}

/// Renders `file` as the process `pid` should see it.
pub fn render_for(roots: &Roots, loads: &Loads, file: ViewFile, pid: u32) -> Vec<u8> {
    let view = roots.view_for(pid, file.needs());
    let host = |name: &str| std::fs::read_to_string(roots.proc.join(name)).unwrap_or_default();
    let text = match file {
        ViewFile::Meminfo => render::meminfo(&host("meminfo"), &view),
        ViewFile::Cpuinfo => render::cpuinfo(&host("cpuinfo"), &view),
        ViewFile::Stat => render::stat(&host("stat"), &view, clock_ticks()),
        ViewFile::Loadavg => {
            let load = view
                .cgroup_key
                .as_deref()
                .map(|k| loads.read(k))
                .unwrap_or_default();
            render::loadavg(&host("loadavg"), &view, load)
        }
        ViewFile::Uptime => render::uptime(&view),
        ViewFile::Swaps => render::swaps(&host("meminfo"), &view),
        ViewFile::CpuOnline => render::cpu_online(&view),
    };
    text.into_bytes()
}

/// The size files claim; more than any rendered file.
const SPLICE_SIZE: u64 = 1 << 20;

/// Attributes are valid this long in the kernel's cache.
const TTL: Duration = Duration::from_secs(1);

pub struct ProcView {
    roots: Roots,
    loads: Loads,
    open: HashMap<u64, Vec<u8>>,
    next_fh: u64,
    started: SystemTime,
}

impl ProcView {
    pub fn new(roots: Roots, loads: Loads) -> Self {
        ProcView {
            roots,
            loads,
            open: HashMap::new(),
            next_fh: 1,
            started: SystemTime::now(),
        }
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let dir = ino == FUSE_ROOT_ID;
        FileAttr {
            ino,
            // Not 0 as procfs says: read(2) goes straight to us (direct
            // I/O) whatever the size, but since Linux 6.5 splice and
            // sendfile(2) (busybox cat) read FUSE files through the page
            // cache, bounded by the size. Our short read there makes the
            // kernel cut the size to what we returned, so they get exactly
            // the content, as read(2) does.
            size: if dir { 0 } else { SPLICE_SIZE },
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: UNIX_EPOCH,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if dir { 0o555 } else { 0o444 },
            nlink: if dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for ProcView {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        // Nothing is ever written: keep the kernel's request buffers small
        // (the keeper's read buffer must hold the largest write).
        let _ = config.set_max_write(crate::keeper::MAX_WRITE);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let file = ViewFile::ALL.iter().find(|f| OsStr::new(f.name()) == name);
        match file {
            Some(f) if parent == FUSE_ROOT_ID => reply.entry(&TTL, &self.attr(f.ino()), 0),
            _ => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        if ino == FUSE_ROOT_ID || ViewFile::from_ino(ino).is_some() {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(libc::ENOENT);
        }
    }

    fn open(&mut self, req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let Some(file) = ViewFile::from_ino(ino) else {
            return reply.error(libc::ENOENT);
        };
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EACCES);
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.open
            .insert(fh, render_for(&self.roots, &self.loads, file, req.pid()));
        reply.opened(fh, FOPEN_DIRECT_IO);
    }

    fn read(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(file) = ViewFile::from_ino(ino) else {
            return reply.error(libc::ENOENT);
        };
        let content = self
            .open
            .entry(fh)
            .or_insert_with(|| render_for(&self.roots, &self.loads, file, req.pid()));
        let start = usize::try_from(offset).unwrap_or(0).min(content.len());
        let end = start.saturating_add(size as usize).min(content.len());
        reply.data(&content[start..end]);
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.open.remove(&fh);
        reply.ok();
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != FUSE_ROOT_ID {
            return reply.error(libc::ENOTDIR);
        }
        let mut entries = vec![
            (FUSE_ROOT_ID, FileType::Directory, "."),
            (FUSE_ROOT_ID, FileType::Directory, ".."),
        ];
        entries.extend(
            ViewFile::ALL
                .iter()
                .map(|f| (f.ino(), FileType::RegularFile, f.name())),
        );
        for (i, (ino, kind, name)) in entries
            .into_iter()
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(0))
        {
            if reply.add(ino, i as i64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
