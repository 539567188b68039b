//! What each kind of VMM thread may call. The lists come from what the
//! code of each thread does (named beside each group) plus what Rust's
//! standard library and glibc do underneath any thread (allocation, locks,
//! a thread's start and end); `docs/security.md` says how they were
//! checked against the calls real pod VMs make.

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// The kinds of thread a running VMM has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread once the VM runs: serves the control API's actions
    /// (pause kicks vCPUs, attach_disk takes an open disk), joins the rest.
    Vmm,
    /// Runs the guest (KVM_RUN) and the devices served on it: serial,
    /// virtio-mmio, virtio-blk (disk I/O), the balloon (madvise).
    Vcpu,
    /// The control socket: accepts and reads requests, passes disks' fds.
    Api,
    /// Host input for the serial console.
    ConsoleInput,
    /// Starts device worker threads for the vCPU threads (a vCPU may not
    /// create threads); its filter is also the one its new threads run
    /// with until they enter theirs, so it allows theirs too.
    Spawner,
    /// A device's queue worker: virtio-net on its tap, vsock on its unix
    /// sockets.
    DeviceWorker,
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// `ioctl` request types (bits 8 to 15 of the request number).
const IOCTL_KVM: u64 = 0xae;
/// 'T': terminals, FIONBIO and FIOCLEX, and the tun/tap device's TUNSET*.
const IOCTL_TERMINAL_AND_TUN: u64 = b'T' as u64;

impl ThreadKind {
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::ConsoleInput,
        ThreadKind::Spawner,
        ThreadKind::DeviceWorker,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
            ThreadKind::ConsoleInput => "console-input",
            ThreadKind::Spawner => "spawner",
            ThreadKind::DeviceWorker => "device-worker",
        }
    }

    /// The allow list of this kind, for the process `pid`.
    pub(super) fn rules(self, pid: i32) -> Result<Rules, BackendError> {
        let mut rules = Rules::new();
        allow(&mut rules, ANY_THREAD);
        match self {
            ThreadKind::Vmm => {
                allow(
                    &mut rules,
                    &[libc::SYS_fstat, libc::SYS_statx, libc::SYS_lseek],
                );
                allow(&mut rules, &[libc::SYS_fcntl]);
                // The devices, dropped here at the end, remove their
                // sockets (in a jail, which is read-only, they stay).
                allow(&mut rules, &[libc::SYS_unlink, libc::SYS_unlinkat]);
                // Kicks: signals to its own vCPU threads only.
                rules.insert(libc::SYS_tgkill, vec![rule(&[eq(0, pid as u64)?])?]);
                // The terminal of `--console stdio` goes back to cooked mode.
                ioctl_types(&mut rules, &[IOCTL_TERMINAL_AND_TUN])?;
            }
            ThreadKind::Vcpu => {
                // virtio-blk requests.
                allow(
                    &mut rules,
                    &[
                        libc::SYS_pread64,
                        libc::SYS_pwrite64,
                        libc::SYS_preadv,
                        libc::SYS_pwritev,
                        libc::SYS_preadv2,
                        libc::SYS_pwritev2,
                        libc::SYS_fdatasync,
                        libc::SYS_fsync,
                        libc::SYS_lseek,
                    ],
                );
                // Activating a worker device: its eventfds.
                allow(&mut rules, &[libc::SYS_eventfd2, libc::SYS_fcntl]);
                // KVM_RUN and the vCPU's registers; TUNSETOFFLOAD when
                // virtio-net is activated.
                ioctl_types(&mut rules, &[IOCTL_KVM, IOCTL_TERMINAL_AND_TUN])?;
            }
            ThreadKind::Api => {
                allow(&mut rules, POLL);
                allow(
                    &mut rules,
                    &[
                        libc::SYS_accept4,
                        libc::SYS_recvfrom,
                        libc::SYS_recvmsg,
                        libc::SYS_sendto,
                        libc::SYS_sendmsg,
                        libc::SYS_fcntl,
                        // The socket file goes when the server ends.
                        libc::SYS_unlink,
                        libc::SYS_unlinkat,
                    ],
                );
                // FIONBIO.
                ioctl_types(&mut rules, &[IOCTL_TERMINAL_AND_TUN])?;
            }
            ThreadKind::ConsoleInput => {
                allow(&mut rules, POLL);
                // The input goes non-blocking.
                allow(&mut rules, &[libc::SYS_fcntl]);
            }
            ThreadKind::DeviceWorker => device_worker(&mut rules)?,
            ThreadKind::Spawner => {
                device_worker(&mut rules)?;
                // Threads, never processes: clone only with CLONE_THREAD
                // (clone3, whose flags a filter cannot see, is answered
                // ENOSYS by a second filter, so glibc falls back to clone).
                rules.insert(
                    libc::SYS_clone,
                    vec![rule(&[masked_eq(
                        0,
                        libc::CLONE_THREAD as u64,
                        libc::CLONE_THREAD as u64,
                    )?])?],
                );
                allow(
                    &mut rules,
                    &[
                        libc::SYS_clone3,
                        // A new thread's own start, up to entering its
                        // filter (which only ever narrows what it may do).
                        libc::SYS_set_robust_list,
                        libc::SYS_rseq,
                        libc::SYS_prctl,
                        libc::SYS_seccomp,
                        libc::SYS_sched_getaffinity,
                    ],
                );
            }
        }
        Ok(rules)
    }

    /// Calls this kind answers with an error instead of allowing or
    /// trapping (a second filter on top of the allow list, which allows
    /// them): clone3 for the spawner, so glibc creates threads with clone.
    pub(super) fn refused_with_enosys(self) -> &'static [i64] {
        match self {
            ThreadKind::Spawner => &[libc::SYS_clone3],
            _ => &[],
        }
    }
}

/// A device worker: epoll over its queues' eventfds and its backend, the
/// tap's frames, vsock's unix sockets (host clients connecting, the guest
/// connecting to host listeners).
fn device_worker(rules: &mut Rules) -> Result<(), BackendError> {
    allow(rules, POLL);
    allow(
        rules,
        &[
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_fcntl,
            libc::SYS_eventfd2,
        ],
    );
    rules.insert(
        libc::SYS_socket,
        vec![rule(&[eq(0, libc::AF_UNIX as u64)?])?],
    );
    // FIONBIO on new connections.
    ioctl_types(rules, &[IOCTL_TERMINAL_AND_TUN])
}

/// Under every thread: memory, locks, signals' return, time, a thread's
/// end, and writing a message.
const ANY_THREAD: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

const POLL: &[i64] = &[libc::SYS_poll, libc::SYS_ppoll];

fn allow(rules: &mut Rules, syscalls: &[i64]) {
    for &syscall in syscalls {
        rules.insert(syscall, Vec::new());
    }
}

/// `ioctl` with a request of one of `types` only.
fn ioctl_types(rules: &mut Rules, types: &[u64]) -> Result<(), BackendError> {
    let entry = rules.entry(libc::SYS_ioctl).or_default();
    for &kind in types {
        entry.push(rule(&[masked_eq(1, 0xff00, kind << 8)?])?);
    }
    Ok(())
}

fn rule(conditions: &[SeccompCondition]) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(conditions.to_vec())
}

fn eq(arg: u8, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

fn masked_eq(arg: u8, mask: u64, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )
}
