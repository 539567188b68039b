//! A truthful `/proc` for containers, as lxcfs gives it, built into vmrun.
//!
//! A container in namespaces still reads the host's `/proc/meminfo`,
//! `cpuinfo`, `stat`, `loadavg`, `uptime` and `swaps`: `free`, `top`, JVMs
//! and autoscalers then size themselves for the whole machine. This crate
//! serves those files from a FUSE filesystem, one per host (or per guest),
//! rendered for whichever process reads them, from that process's cgroup:
//! memory totals from its limit, CPUs from its quota and cpuset, uptime from
//! its oldest process. The pod layer bind-mounts the files over the
//! container's own.
//!
//! * [`view`] reads a container's limits and usage from its cgroup;
//! * [`render`] writes the files from them (pure, unit-tested);
//! * [`fs`] is the FUSE filesystem, [`loadavg`] its load sampler;
//! * [`keeper`] mounts it and survives its worker's crashes;
//! * [`daemon`] starts the host's daemon on demand.

pub mod daemon;
pub mod fs;
pub mod keeper;
pub mod loadavg;
pub mod render;
pub mod view;

pub use daemon::{ensure_running, StartError, DEFAULT_MOUNTPOINT};
pub use fs::ViewFile;
pub use keeper::is_served;
