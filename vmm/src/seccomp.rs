//! seccomp filters for every thread: those that act on guest input (vCPU threads, the
//! device-work executor for virtio activations and resets, virtio device workers, the INTx
//! resampler) and the control plane (the main thread once the machine is built, the QMP
//! command and event threads, the signal thread, the hot-plug thread: [`main_filter_with`],
//! [`qmp_filter_with`], [`qmp_events_filter_with`], [`signals_filter_with`],
//! [`hotplug_filter_with`]). Built with the `seccompiler` crate, applied per thread, never
//! process-wide.
//!
//! The allow-lists come from `strace -f` of the probe guest (config, ECAM, MSI-X, serial exits
//! and virtio driver bring-ups and resets) and of the device workers, plus what the code reached
//! from those threads can do:
//!
//! - vCPU threads (`VCPU`, `VCPU_IOCTLS`): `KVM_RUN` and the few VM ioctls a config or BAR write leads to
//!   (`KVM_IOEVENTFD` when BAR 4 or decode moves the notify area, `KVM_SET_GSI_ROUTING` when
//!   MSI-X vectors are programmed, `KVM_GET_REGS` / `KVM_GET_SREGS` / `KVM_TRANSLATE` for error
//!   reports); serial output and eventfd signalling (`write`); memory management; futexes;
//!   signals (the kick out of `KVM_RUN`); clocks. No thread creation, no `open`, no epoll, no
//!   eventfd creation, no device I/O: a status write that activates or resets a virtio device
//!   is posted to the executor.
//! - the executor ([`executor_filter`]): the device filter plus starting workers (`clone`,
//!   `clone3` and the new thread's set-up, `epoll_create1`, `dup`) and opening files (`open`,
//!   `openat`).
//! - device workers: epoll, eventfds, queue I/O on their backend fd (read/write/pread/pwrite
//!   and their vector forms, `fdatasync`, `lseek`), `getrandom` (virtio-rng), the console's
//!   listening socket (`accept4`, `recvfrom`, `sendto`, `setsockopt`, `ioctl(FIONBIO)`).
//!
//! Filters stack: a thread created by a filtered thread inherits its filter, and a filter applied
//! later can only narrow what is allowed. A worker started from the executor therefore runs
//! under the executor filter *and* its own; the executor filter is a superset of the device
//! filter for that reason (see [`executor_filter`]).
//!
//! Nothing here panics: building or applying a filter returns an [`Error`].

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// A compiled filter, ready for [`apply`].
pub type Filter = BpfProgram;

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The filter could not be compiled (unsupported architecture, bad rule).
    #[error("cannot build the seccomp filter: {0}")]
    Build(String),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter: {0}")]
    Apply(String),
}

const KVMIO: u64 = 0xAE;

const fn io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}

const fn iow(nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

use std::mem::size_of;

/// `KVM_RUN`.
pub const KVM_RUN: u64 = io(0x80);
/// `KVM_GET_REGS`.
pub const KVM_GET_REGS: u64 = ior(0x81, size_of::<kvm_bindings::kvm_regs>());
/// `KVM_GET_SREGS`.
pub const KVM_GET_SREGS: u64 = ior(0x83, size_of::<kvm_bindings::kvm_sregs>());
/// `KVM_TRANSLATE`.
pub const KVM_TRANSLATE: u64 = iowr(0x85, size_of::<kvm_bindings::kvm_translation>());
/// `KVM_IRQFD`.
pub const KVM_IRQFD: u64 = iow(0x76, size_of::<kvm_bindings::kvm_irqfd>());
/// `KVM_IOEVENTFD`.
pub const KVM_IOEVENTFD: u64 = iow(0x79, size_of::<kvm_bindings::kvm_ioeventfd>());
/// `KVM_SET_GSI_ROUTING` (the header only; the entries follow it).
pub const KVM_SET_GSI_ROUTING: u64 = iow(0x6a, size_of::<kvm_bindings::kvm_irq_routing>());
/// `KVM_SIGNAL_MSI`.
pub const KVM_SIGNAL_MSI: u64 = iow(0xa5, size_of::<kvm_bindings::kvm_msi>());
/// `FIONBIO` (std's `set_nonblocking` on a socket).
pub const FIONBIO: u64 = 0x5421;

/// Syscalls every filtered thread may make (memory, futexes, signals, thread exit, plain reads
/// and writes, clocks): all a vCPU thread needs besides its ioctls.
const VCPU: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    // Debug builds check an fd with fcntl(F_GETFD) before closing it (std's OwnedFd).
    libc::SYS_fcntl,
];

/// What device threads wait and draw on besides (epoll, eventfds, entropy).
const EVENTS: &[libc::c_long] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_getrandom,
];

/// Thread creation and set-up (the executor starts a device worker at `DRIVER_OK`).
const THREADS: &[libc::c_long] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_epoll_create1,
    libc::SYS_dup,
];

/// Opening files (the executor: a backend opened at activation).
const OPEN: &[libc::c_long] = &[libc::SYS_open, libc::SYS_openat];

/// Backend I/O of device workers.
const DEVICE_IO: &[libc::c_long] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// ioctl requests a vCPU thread makes.
const VCPU_IOCTLS: &[u64] = &[
    KVM_RUN,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_TRANSLATE,
    KVM_IOEVENTFD,
    KVM_SET_GSI_ROUTING,
];

/// ioctl requests a device worker makes.
const DEVICE_IOCTLS: &[u64] = &[FIONBIO, KVM_SIGNAL_MSI];

/// Files by path: records and machine dumps written atomically (create, write, `fsync`,
/// rename, unlink of a temporary), images and kernels looked at, stale sockets replaced,
/// paths made absolute.
const FILES: &[libc::c_long] = &[
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstat,
    libc::SYS_lstat,
    libc::SYS_stat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_getcwd,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_lseek,
    // Guest RAM in a file (`--mem-path`), at start and at every reboot.
    libc::SYS_ftruncate,
    libc::SYS_fstatfs,
];

/// Unix-domain sockets besides `socket(AF_UNIX)` itself (allowed by argument in [`build`]):
/// the QMP socket, console sockets, the wake-up connection that stops the QMP server.
const UNIX_SOCKETS: &[libc::c_long] = &[
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
];

/// Signalling threads of this process: `tgkill` kicks a vCPU out of `KVM_RUN` (pause, stop).
const KICK: &[libc::c_long] = &[libc::SYS_tgkill];

/// `TUNSETIFF` (tap set-up through `/dev/net/tun`).
pub const TUNSETIFF: u64 = 0x4004_54ca;
/// `TUNSETOFFLOAD`.
pub const TUNSETOFFLOAD: u64 = 0x4004_54d0;
/// `TUNSETVNETHDRSZ`.
pub const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;

/// ioctl requests of the threads that realize devices, besides the KVM ones: tap set-up and
/// `FIONBIO` (sockets).
const CONTROL_IOCTLS: &[u64] = &[FIONBIO, TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ];

/// ioctl requests of the main thread outside the KVM ones: the control plane's (taps, sockets)
/// and `TCGETS` / `TCSETS` (`isatty`, the console's raw mode and its restoration).
const MAIN_IOCTLS: &[u64] = &[
    FIONBIO,
    TUNSETIFF,
    TUNSETOFFLOAD,
    TUNSETVNETHDRSZ,
    libc::TCGETS,
    libc::TCSETS,
];

/// What the control plane does (rebuilding the guest at a reboot, realizing a hot-plugged
/// device, starting vCPUs): the executor's and device workers' lists (threads it starts
/// inherit its filter), files by path, unix sockets, kicking vCPUs.
const CONTROL: &[&[libc::c_long]] = &[
    VCPU,
    EVENTS,
    DEVICE_IO,
    THREADS,
    OPEN,
    FILES,
    UNIX_SOCKETS,
    KICK,
];

/// The signal thread: waiting for SIGINT/SIGTERM.
const SIGWAIT: &[libc::c_long] = &[libc::SYS_rt_sigtimedwait];

/// The QMP event writer: writes to the client (`sendto`: std writes to a unix stream with
/// `MSG_NOSIGNAL`) and `shutdown` of a client that does not read.
const EVENT_WRITES: &[libc::c_long] = &[libc::SYS_sendto, libc::SYS_shutdown];

/// The hot-plug thread's own set-up: its epoll.
const EPOLL_CREATE: &[libc::c_long] = &[libc::SYS_epoll_create1];

fn arch() -> Result<TargetArch, Error> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e| Error::Build(format!("{e:?}")))
}

fn eq(arg: u8, len: SeccompCmpArgLen, value: u64) -> Result<SeccompCondition, Error> {
    SeccompCondition::new(arg, len, SeccompCmpOp::Eq, value)
        .map_err(|e| Error::Build(e.to_string()))
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, Error> {
    SeccompRule::new(conds).map_err(|e| Error::Build(e.to_string()))
}

/// What a filter allows besides `prctl(PR_SET_NAME / PR_SET_NO_NEW_PRIVS)` and
/// `seccomp(SET_MODE_FILTER)`, which every filter allows (see [`build`]).
struct Allow<'a> {
    /// Syscalls allowed whatever their arguments.
    syscalls: &'a [&'a [libc::c_long]],
    /// `ioctl` requests allowed (exact numbers).
    ioctls: &'a [u64],
    /// Any KVM ioctl (type `0xAE`): the threads that build the VM or wire devices into it.
    any_kvm_ioctl: bool,
    /// `socket(AF_UNIX, ...)` (no other family).
    unix_sockets: bool,
}

impl Allow<'_> {
    const fn only(syscalls: &'static [&'static [libc::c_long]], ioctls: &'static [u64]) -> Self {
        Allow {
            syscalls,
            ioctls,
            any_kvm_ioctl: false,
            unix_sockets: false,
        }
    }
}

/// Builds a filter allowing `allow.syscalls` unconditionally, `ioctl` only with the listed
/// requests (or any KVM request), `socket` only for `AF_UNIX` if asked, `prctl` only as
/// `PR_SET_NAME` (thread names) and `PR_SET_NO_NEW_PRIVS`, and `seccomp` only as
/// `SECCOMP_SET_MODE_FILTER` (a device worker started from a vCPU thread installs its own,
/// narrower filter on top of the inherited one: filters can only narrow); everything else gets
/// `mismatch`.
fn build(allow: &Allow<'_>, mismatch: SeccompAction) -> Result<Filter, Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for set in allow.syscalls {
        for &nr in *set {
            rules.insert(nr, Vec::new());
        }
    }
    let mut ioctl_rules = Vec::new();
    for &req in allow.ioctls {
        // The request is an `unsigned long`; compare its low 32 bits (all ioctl numbers fit).
        ioctl_rules.push(rule(vec![eq(1, SeccompCmpArgLen::Dword, req)?])?);
    }
    if allow.any_kvm_ioctl {
        // The type byte of the request (bits 8..16) is KVMIO.
        ioctl_rules.push(rule(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xff00),
            KVMIO << 8,
        )
        .map_err(|e| Error::Build(e.to_string()))?])?);
    }
    // An empty rule list would allow the syscall with any arguments: only add it with rules.
    if !ioctl_rules.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctl_rules);
    }
    if allow.unix_sockets {
        rules.insert(
            libc::SYS_socket,
            vec![rule(vec![eq(
                0,
                SeccompCmpArgLen::Dword,
                libc::AF_UNIX as u64,
            )?])?],
        );
    }
    rules.insert(
        libc::SYS_prctl,
        vec![
            rule(vec![eq(
                0,
                SeccompCmpArgLen::Dword,
                libc::PR_SET_NAME as u64,
            )?])?,
            rule(vec![eq(
                0,
                SeccompCmpArgLen::Dword,
                libc::PR_SET_NO_NEW_PRIVS as u64,
            )?])?,
        ],
    );
    const SECCOMP_SET_MODE_FILTER: u64 = 1;
    rules.insert(
        libc::SYS_seccomp,
        vec![rule(vec![eq(
            0,
            SeccompCmpArgLen::Dword,
            SECCOMP_SET_MODE_FILTER,
        )?])?],
    );
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch()?)
        .map_err(|e| Error::Build(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Build(e.to_string()))
}

/// The vCPU-thread filter with the given action for anything not allowed.
pub fn vcpu_filter_with(mismatch: SeccompAction) -> Result<Filter, Error> {
    build(&Allow::only(&[VCPU], VCPU_IOCTLS), mismatch)
}

/// The device-worker filter with the given action for anything not allowed.
pub fn device_filter_with(mismatch: SeccompAction) -> Result<Filter, Error> {
    build(
        &Allow::only(&[VCPU, EVENTS, DEVICE_IO], DEVICE_IOCTLS),
        mismatch,
    )
}

/// The device-work executor's filter with the given action for anything not allowed: the
/// device filter (a superset of it: the workers it starts inherit it) plus thread creation and
/// opening files.
pub fn executor_filter_with(mismatch: SeccompAction) -> Result<Filter, Error> {
    build(
        &Allow::only(&[VCPU, EVENTS, DEVICE_IO, THREADS, OPEN], DEVICE_IOCTLS),
        mismatch,
    )
}

/// The main thread's filter once the guest is set up (the console loop, reboots, the end):
/// the control plane ([`CONTROL`]: a reboot builds a new KVM VM with its devices, starts the
/// executor, the INTx resampler and the vCPUs, which inherit this filter), any KVM ioctl, tap
/// set-up, `FIONBIO` and the terminal's `TCGETS` / `TCSETS`; `socket` for `AF_UNIX` only.
pub fn main_filter_with(mismatch: SeccompAction) -> Result<Filter, Error> {
    build(
        &Allow {
            syscalls: CONTROL,
            ioctls: MAIN_IOCTLS,
            any_kvm_ioctl: true,
            unix_sockets: true,
        },
        mismatch,
    )
}

/// The QMP server thread's filter (it runs the commands: `device_add` opens images, taps and
/// console sockets and wires the device into the VM; `cont` starts the vCPU threads, which
/// inherit it): the control plane ([`CONTROL`]), any KVM ioctl, tap set-up and `FIONBIO`;
/// `socket` for `AF_UNIX` only. No terminal ioctls.
pub fn qmp_filter_with(mismatch: SeccompAction) -> Result<Filter, Error> {
    build(
        &Allow {
            syscalls: CONTROL,
            ioctls: CONTROL_IOCTLS,
            any_kvm_ioctl: true,
            unix_sockets: true,
        },
        mismatch,
    )
}

/// The QMP event writer's filter: the common list ([`VCPU`]: writes, futexes, memory),
/// `sendto` and `shutdown`; no ioctl, no open, no socket.
pub fn qmp_events_filter_with(mismatch: SeccompAction) -> Result<Filter, Error> {
    build(&Allow::only(&[VCPU, EVENT_WRITES], &[]), mismatch)
}

/// The signal thread's filter: the common list and `rt_sigtimedwait`; no ioctl, no open, no
/// socket.
pub fn signals_filter_with(mismatch: SeccompAction) -> Result<Filter, Error> {
    build(&Allow::only(&[VCPU, SIGWAIT], &[]), mismatch)
}

/// The hot-plug thread's filter (completing ejects: a device is unwired from the VM, its
/// worker joined, the record rewritten; GED interrupts raised again): the common list, epoll
/// and eventfds, device I/O, files by path and `open`, any KVM ioctl. No thread creation, no
/// socket.
pub fn hotplug_filter_with(mismatch: SeccompAction) -> Result<Filter, Error> {
    build(
        &Allow {
            syscalls: &[VCPU, EVENTS, EPOLL_CREATE, DEVICE_IO, OPEN, FILES],
            ioctls: &[],
            any_kvm_ioctl: true,
            unix_sockets: false,
        },
        mismatch,
    )
}

/// What a forbidden syscall gets at `level` (None: `--seccomp off`, no filters).
pub fn mismatch_action(level: crate::cli::SeccompLevel) -> Option<SeccompAction> {
    use crate::cli::SeccompLevel;
    match level {
        SeccompLevel::Off => None,
        SeccompLevel::Kill => Some(SeccompAction::KillProcess),
        SeccompLevel::Log => Some(SeccompAction::Log),
    }
}

/// Builds the filter for `level` with `make` (None for `--seccomp off`).
pub fn filter_for(
    level: crate::cli::SeccompLevel,
    make: fn(SeccompAction) -> Result<Filter, Error>,
) -> Result<Option<Filter>, Error> {
    mismatch_action(level).map(make).transpose()
}

/// Starts a named thread that installs `filter` (if any) first, then runs `f`. Returns once
/// the filter is in place: Err if the thread cannot be created or the kernel refuses the
/// filter (then `f` never runs).
pub fn spawn_confined<T: Send + 'static>(
    name: &str,
    filter: Option<Filter>,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<Option<T>>> {
    let (ready, set_up) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let applied = filter.as_ref().map_or(Ok(()), apply);
            let ok = applied.is_ok();
            let _ = ready.send(applied);
            ok.then(f)
        })?;
    match set_up.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(std::io::Error::other(format!("{name} thread: {e}"))),
        Err(_) => Err(std::io::Error::other(format!("{name} thread ended"))),
    }
}

/// The filter for vCPU threads: a forbidden syscall kills the process (`SIGSYS`).
pub fn vcpu_filter() -> Result<Filter, Error> {
    vcpu_filter_with(SeccompAction::KillProcess)
}

/// The filter for virtio device worker threads: a forbidden syscall kills the process.
pub fn device_filter() -> Result<Filter, Error> {
    device_filter_with(SeccompAction::KillProcess)
}

/// The filter for the device-work executor: a forbidden syscall kills the process.
pub fn executor_filter() -> Result<Filter, Error> {
    executor_filter_with(SeccompAction::KillProcess)
}

/// Makes glibc's allocator safe to use under the filters; call it first thing in `main`, before
/// any other thread exists. glibc gives threads their own malloc arenas, and a thread that frees
/// enough to shrink its arena's heap reads `/proc/sys/vm/overcommit_memory` (an `openat`, which
/// the filters refuse) the first time any thread does: the vmm died with SIGSYS in a virtio
/// worker, depending on how the threads' allocations happened to fall. With one arena (the
/// main, brk-based one, which shrinks with `brk`) no heap of that kind exists. The data path
/// allocates nothing, so the shared arena's lock is not on it.
pub fn prepare_allocator() {
    // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Installs `filter` on the calling thread (sets `no_new_privs` first). Threads it creates
/// afterwards inherit it; other threads are not affected.
pub fn apply(filter: &Filter) -> Result<(), Error> {
    seccompiler::apply_filter(filter).map_err(|e| Error::Apply(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    fn in_filtered_thread<R: Send + 'static>(
        filter: Filter,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> R {
        std::thread::spawn(move || {
            apply(&filter).expect("apply");
            f()
        })
        .join()
        .expect("filtered thread")
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_abi() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_IRQFD, 0x4020_ae76);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(KVM_SIGNAL_MSI, 0x4020_aea5);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_TRANSLATE, 0xc018_ae85);
    }

    #[test]
    fn vcpu_filter_refuses_sockets_exec_threads_and_files_but_allows_its_work() {
        let filter = vcpu_filter_with(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let ev = EventFd::new(0).unwrap();
        let (sock, exec, ioctl_other, ioctl_run, work, refused) =
            in_filtered_thread(filter, move || {
                // SAFETY: plain syscalls with valid (or null) arguments; results only inspected.
                let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                let sock_errno = errno();
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                // SAFETY: a valid path and a null-terminated argv; on success it would not return.
                let exec = unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), std::ptr::null()) };
                let exec_errno = errno();
                let mut n = 0i32;
                // SAFETY: FIONREAD on an eventfd with a valid out pointer.
                unsafe {
                    libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&ev), libc::FIONREAD, &mut n)
                };
                let other_errno = errno();
                // SAFETY: KVM_RUN on an eventfd: the kernel answers ENOTTY (the filter let it by).
                unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&ev), KVM_RUN as _) };
                let run_errno = errno();
                // What a vCPU thread does besides: eventfd signalling, allocation.
                ev.write(1).unwrap();
                let v = vec![0u8; 1 << 20];
                // What it must no longer do: threads, files, epoll, new eventfds, device I/O.
                let mut refused = Vec::new();
                if std::thread::Builder::new().spawn(|| ()).is_err() {
                    refused.push("clone");
                }
                let open = std::fs::File::open("/etc/hostname").err();
                if open.and_then(|e| e.raw_os_error()) == Some(libc::EPERM) {
                    refused.push("open");
                }
                if vmm_sys_util::epoll::Epoll::new().is_err() && errno() == libc::EPERM {
                    refused.push("epoll_create1");
                }
                if EventFd::new(0).is_err() && errno() == libc::EPERM {
                    refused.push("eventfd2");
                }
                let mut b = [0u8; 8];
                // SAFETY: a pread into a valid 8-byte buffer; the result is only inspected.
                let r = unsafe {
                    libc::pread(
                        std::os::fd::AsRawFd::as_raw_fd(&ev),
                        b.as_mut_ptr().cast(),
                        8,
                        0,
                    )
                };
                if r < 0 && errno() == libc::EPERM {
                    refused.push("pread64");
                }
                (
                    (sock, sock_errno),
                    (exec, exec_errno),
                    other_errno,
                    run_errno,
                    (v.len(), ev.read().unwrap()),
                    refused,
                )
            });
        assert_eq!(sock, (-1, libc::EPERM));
        assert_eq!(exec, (-1, libc::EPERM));
        assert_eq!(ioctl_other, libc::EPERM);
        assert_eq!(ioctl_run, libc::ENOTTY);
        assert_eq!(work, (1 << 20, 1));
        assert_eq!(
            refused,
            ["clone", "open", "epoll_create1", "eventfd2", "pread64"]
        );
    }

    #[test]
    fn executor_filter_allows_workers_and_files_but_not_kvm_run_or_sockets() {
        let filter = executor_filter_with(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let (spawned, opened, run_errno, sock) = in_filtered_thread(filter, || {
            let spawned = std::thread::Builder::new()
                .spawn(|| 7)
                .map(|h| h.join().unwrap());
            let opened = std::fs::File::open("/etc/hostname").is_ok();
            let ev = EventFd::new(0).unwrap();
            // SAFETY: KVM_RUN on an eventfd; refused by the filter before the kernel sees it.
            unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&ev), KVM_RUN as _) };
            let run_errno = errno();
            // SAFETY: plain socket(2) call, the result is only checked.
            let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            (spawned.ok(), opened, run_errno, sock)
        });
        assert_eq!(spawned, Some(7));
        assert!(opened);
        assert_eq!(run_errno, libc::EPERM);
        assert_eq!(sock, -1);
    }

    #[test]
    fn device_filter_refuses_threads_and_kvm_run() {
        let filter = device_filter_with(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let (spawned, run_errno, open_errno, random) = in_filtered_thread(filter, || {
            let spawned = std::thread::Builder::new().spawn(|| ()).is_ok();
            let ev = EventFd::new(0).unwrap();
            // SAFETY: KVM_RUN on an eventfd; refused by the filter before the kernel sees it.
            unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&ev), KVM_RUN as _) };
            let run_errno = errno();
            let open_errno = std::fs::File::open("/etc/hostname")
                .err()
                .and_then(|e| e.raw_os_error());
            let mut b = [0u8; 16];
            // SAFETY: a writable 16-byte buffer.
            let random = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
            (spawned, run_errno, open_errno, random)
        });
        assert!(!spawned, "a device worker must not create threads");
        assert_eq!(run_errno, libc::EPERM);
        assert_eq!(open_errno, Some(libc::EPERM));
        assert_eq!(random, 16);
    }

    #[test]
    fn forbidden_syscall_kills_the_process() {
        // The real (KillProcess) filter, in a forked child so the test process survives. The
        // filter is built before the fork: the child only installs it and makes syscalls.
        let filter = vcpu_filter().unwrap();
        // SAFETY: the child calls only async-signal-safe functions (prctl/seccomp via
        // `apply_filter` on an already built program, write, socket, _exit).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = match seccompiler::apply_filter(&filter) {
                Ok(()) => {
                    // Allowed: a write to stderr (empty).
                    // SAFETY: a zero-length write from a valid pointer.
                    unsafe { libc::write(2, c"".as_ptr().cast(), 0) };
                    // SAFETY: plain syscall; it must not return.
                    unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                    3
                }
                Err(_) => 2,
            };
            // SAFETY: ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child with a valid status pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "child status {status:#x}: expected death by SIGSYS"
        );
    }

    /// Runs `forbidden` in a forked child under the real (KillProcess) filter `make` builds:
    /// the child must die by SIGSYS (exit 3 if the call returned, 2 if the filter was refused).
    fn killed_by_sigsys(make: fn(SeccompAction) -> Result<Filter, Error>, forbidden: fn()) {
        let filter = make(SeccompAction::KillProcess).unwrap();
        // SAFETY: the child only installs the already built filter, makes the forbidden
        // syscall and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = match seccompiler::apply_filter(&filter) {
                Ok(()) => {
                    forbidden();
                    3
                }
                Err(_) => 2,
            };
            // SAFETY: ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child with a valid status pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "child status {status:#x}: expected death by SIGSYS"
        );
    }

    fn inet_socket() {
        // SAFETY: plain socket(2) call; under the filter it does not return.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    }

    fn open_file() {
        // SAFETY: a valid NUL-terminated path; under the filter it does not return.
        unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
    }

    fn new_thread() {
        // SAFETY: clone with thread flags and no stack would crash the child if it ran: under
        // the filter it does not. (A process-creating clone is as forbidden.)
        unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
    }

    #[test]
    fn a_forbidden_call_from_the_main_thread_kills_the_process() {
        killed_by_sigsys(main_filter_with, inet_socket);
    }

    #[test]
    fn a_forbidden_call_from_the_qmp_thread_kills_the_process() {
        killed_by_sigsys(qmp_filter_with, inet_socket);
    }

    #[test]
    fn a_forbidden_call_from_the_qmp_event_thread_kills_the_process() {
        killed_by_sigsys(qmp_events_filter_with, open_file);
    }

    #[test]
    fn a_forbidden_call_from_the_signal_thread_kills_the_process() {
        killed_by_sigsys(signals_filter_with, open_file);
    }

    #[test]
    fn a_forbidden_call_from_the_hotplug_thread_kills_the_process() {
        killed_by_sigsys(hotplug_filter_with, new_thread);
    }

    /// What one filtered thread could do: each entry is a call and whether the filter let it
    /// through (EPERM means refused; any other result, success or another error, means the
    /// kernel saw it).
    fn reach(filter: Filter) -> BTreeMap<&'static str, bool> {
        let ev = EventFd::new(0).unwrap();
        in_filtered_thread(filter, move || {
            let mut r = BTreeMap::new();
            let passed = |ret: i64| ret >= 0 || errno() != libc::EPERM;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&ev);
            // SAFETY: plain syscalls with valid or null arguments; results only inspected,
            // descriptors closed. execve of a missing path cannot succeed.
            unsafe {
                let sock = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                r.insert("socket(AF_INET)", passed(sock.into()));
                libc::close(sock);
                let sock = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                r.insert("socket(AF_UNIX)", passed(sock.into()));
                libc::close(sock);
                let path = c"/nonexistent/vmm-seccomp-test";
                let argv = [path.as_ptr(), std::ptr::null()];
                let ret = libc::execve(path.as_ptr(), argv.as_ptr(), std::ptr::null());
                r.insert("execve", passed(ret.into()));
                let ret = libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
                r.insert("ptrace", passed(ret));
                let f = libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY);
                r.insert("open", passed(f.into()));
                libc::close(f);
                let mut n = 0i32;
                let ret = libc::ioctl(fd, libc::FIONREAD, &mut n);
                r.insert("ioctl(FIONREAD)", passed(ret.into()));
                let ret = libc::ioctl(fd, KVM_RUN as _);
                r.insert("ioctl(KVM_RUN)", passed(ret.into()));
                let ret = libc::ioctl(fd, 0xae01); // KVM_CREATE_VM
                r.insert("ioctl(KVM_CREATE_VM)", passed(ret.into()));
                let ret = libc::ioctl(fd, libc::TCGETS, &mut [0u8; 64]);
                r.insert("ioctl(TCGETS)", passed(ret.into()));
            }
            r.insert(
                "thread",
                std::thread::Builder::new()
                    .spawn(|| ())
                    .is_ok_and(|h| h.join().is_ok()),
            );
            r.insert("write", ev.write(1).is_ok());
            r
        })
    }

    fn errno_filter(make: fn(SeccompAction) -> Result<Filter, Error>) -> Filter {
        make(SeccompAction::Errno(libc::EPERM as u32)).unwrap()
    }

    fn passed(r: &BTreeMap<&'static str, bool>) -> Vec<&'static str> {
        r.iter().filter(|(_, ok)| **ok).map(|(k, _)| *k).collect()
    }

    #[test]
    fn the_main_filter_allows_the_control_plane_and_the_terminal_only() {
        let r = reach(errno_filter(main_filter_with));
        assert_eq!(
            passed(&r),
            [
                "ioctl(KVM_CREATE_VM)",
                "ioctl(KVM_RUN)",
                "ioctl(TCGETS)",
                "open",
                "socket(AF_UNIX)",
                "thread",
                "write"
            ]
        );
    }

    #[test]
    fn the_qmp_filter_allows_the_control_plane_without_the_terminal() {
        let r = reach(errno_filter(qmp_filter_with));
        assert_eq!(
            passed(&r),
            [
                "ioctl(KVM_CREATE_VM)",
                "ioctl(KVM_RUN)",
                "open",
                "socket(AF_UNIX)",
                "thread",
                "write"
            ]
        );
    }

    #[test]
    fn the_qmp_event_and_signal_filters_allow_little_more_than_writes() {
        for make in [qmp_events_filter_with, signals_filter_with] {
            let r = reach(errno_filter(make));
            assert_eq!(passed(&r), ["write"]);
        }
    }

    #[test]
    fn the_hotplug_filter_allows_files_and_kvm_but_no_threads_or_sockets() {
        let r = reach(errno_filter(hotplug_filter_with));
        assert_eq!(
            passed(&r),
            ["ioctl(KVM_CREATE_VM)", "ioctl(KVM_RUN)", "open", "write"]
        );
        // A record rewrite (create, write, fsync, rename, directory fsync) under it.
        let dir = std::env::temp_dir().join(format!("seccomp-hotplug-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rec.json");
        let p = path.clone();
        let written = in_filtered_thread(errno_filter(hotplug_filter_with), move || {
            pci::record::write_atomically(&p, b"{}").map_err(|e| e.to_string())
        });
        let back = std::fs::read(&path);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(written, Ok(()));
        assert_eq!(back.unwrap(), b"{}");
    }

    #[test]
    fn vcpu_filter_lets_the_real_kvm_calls_of_a_vcpu_thread_through() {
        // The calls a vCPU thread makes, made for real on /dev/kvm under the filter (EPERM
        // for anything refused): a wrong ioctl number would show here.
        use devices::virtio::pci::VirtioHost;
        let vm = crate::vm::Vm::new(16 << 20, &Default::default()).expect("a VM on /dev/kvm");
        let mut vcpu = vm.fd.create_vcpu(0).expect("vCPU");
        // Made when the machine is built, before any vCPU runs: an eventfd, its irqfd, a GSI.
        let ev = EventFd::new(0).unwrap();
        let (gsi, _irqfd) = vm.allocate_msi().expect("an MSI GSI with its irqfd");
        let filter = vcpu_filter_with(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let refused = std::thread::scope(|s| {
            s.spawn(|| {
                apply(&filter).expect("apply");
                let mut refused = Vec::new();
                let mut check = |what: &str, errno: Option<i32>| {
                    if errno == Some(libc::EPERM) {
                        refused.push(what.to_string());
                    }
                };
                check(
                    "KVM_IOEVENTFD",
                    vm.register_ioevent(&ev, 0xc000_3000)
                        .err()
                        .and_then(|e| e.raw_os_error()),
                );
                check(
                    "KVM_IOEVENTFD (deassign)",
                    vm.unregister_ioevent(&ev, 0xc000_3000)
                        .err()
                        .and_then(|e| e.raw_os_error()),
                );
                // An MSI-X table write reprograms the vector's route.
                let r = vm.set_msi_route(gsi, Some((0xfee0_0000, 0x41)));
                let perm = r
                    .err()
                    .map(|e| e.to_string())
                    .filter(|e| e.contains("Operation not permitted") || e.contains("os error 1)"));
                check("KVM_SET_GSI_ROUTING", perm.map(|_| libc::EPERM));
                check("KVM_GET_REGS", vcpu.get_regs().err().map(|e| e.errno()));
                check("KVM_GET_SREGS", vcpu.get_sregs().err().map(|e| e.errno()));
                check(
                    "KVM_TRANSLATE",
                    vcpu.translate_gva(0).err().map(|e| e.errno()),
                );
                check("KVM_RUN", vcpu.run().err().map(|e| e.errno()));
                refused
            })
            .join()
            .expect("filtered thread")
        });
        assert!(refused.is_empty(), "the vCPU filter refused {refused:?}");
    }

    #[test]
    fn a_virtio_blk_bring_up_and_reset_under_the_vcpu_and_executor_filters() {
        // What a vCPU thread does when a driver brings virtio-blk up (config writes, common
        // config, DRIVER_OK posts the activation, notifies) and resets it, on a real VM, under
        // the vCPU filter; the executor (under its filter) starts the worker, which adds the
        // device filter and serves a write, a read and a flush; the reset joins it there.
        use devices::virtio::blk::{Block, BlockConfig};
        use devices::virtio::pci::{TransportProps, VirtioPciDevice};
        use pci::PciFunction;
        use vm_memory::{Bytes, GuestAddress};

        let img = std::env::temp_dir().join(format!("seccomp-blk-{}.img", std::process::id()));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 16)
            .unwrap();
        let vm = std::sync::Arc::new(
            crate::vm::Vm::new(16 << 20, &Default::default()).expect("a VM on /dev/kvm"),
        );
        let executor = executor_filter_with(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let work = devices::virtio::DeviceWork::start_with(move || {
            apply(&executor).map_err(|e| e.to_string())
        })
        .expect("a filtered executor");
        let host = std::sync::Arc::new(ExecutorHost {
            vm: vm.clone(),
            work,
        });
        let blk = Block::new(&BlockConfig {
            path: img.clone(),
            readonly: false,
            serial: None,
        })
        .unwrap();
        let dev = VirtioPciDevice::new(
            "virtio-blk-pci",
            std::sync::Arc::new(blk),
            TransportProps {
                vectors: 2,
                multifunction: false,
            },
            vm.mem.clone(),
            host,
        )
        .unwrap();
        let mem = vm.mem.clone();
        let filter = vcpu_filter_with(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let statuses = std::thread::scope(|s| {
            s.spawn(|| {
                apply(&filter).expect("apply");
                let cfg = |off: usize, v: &[u8]| {
                    let e = dev.config().write(off, v);
                    dev.config_written(&e);
                };
                cfg(0x20, &0xc000_0000u32.to_le_bytes());
                cfg(0x24, &0u32.to_le_bytes());
                cfg(0x04, &2u16.to_le_bytes());
                let w = |off: u64, v: &[u8]| dev.bar_write(4, off, v);
                w(0x14, &[1]);
                w(0x14, &[3]);
                w(0x08, &1u32.to_le_bytes());
                w(0x0c, &1u32.to_le_bytes());
                w(0x14, &[0xb]);
                w(0x16, &0u16.to_le_bytes());
                w(0x18, &16u16.to_le_bytes());
                let (desc, avail, used) = (0x10000u64, 0x11000u64, 0x12000u64);
                for (off, v) in [(0x20u64, desc), (0x28, avail), (0x30, used)] {
                    w(off, &(v as u32).to_le_bytes());
                    w(off + 4, &((v >> 32) as u32).to_le_bytes());
                }
                w(0x1c, &1u16.to_le_bytes());
                w(0x14, &[0xf]);
                // Requests: (type, data buffer or none); descriptors 3 per request.
                let reqs: [(u32, Option<(u64, bool)>); 3] = [
                    (1, Some((0x14000, false))), // write sector 0 from 0x14000
                    (0, Some((0x16000, true))),  // read sector 0 into 0x16000
                    (4, None),                   // flush
                ];
                mem.write_slice(&[0xa5; 512], GuestAddress(0x14000))
                    .unwrap();
                let mut statuses = Vec::new();
                for (i, (ty, data)) in reqs.iter().enumerate() {
                    let hdr = 0x13000 + 0x100 * i as u64;
                    let status = 0x15000 + 0x100 * i as u64;
                    let mut h = [0u8; 16];
                    h[..4].copy_from_slice(&ty.to_le_bytes());
                    mem.write_slice(&h, GuestAddress(hdr)).unwrap();
                    mem.write_slice(&[0xff], GuestAddress(status)).unwrap();
                    let d0 = 3 * i as u64;
                    let put = |n: u64, addr: u64, len: u32, flags: u16, next: u16| {
                        let mut d = [0u8; 16];
                        d[..8].copy_from_slice(&addr.to_le_bytes());
                        d[8..12].copy_from_slice(&len.to_le_bytes());
                        d[12..14].copy_from_slice(&flags.to_le_bytes());
                        d[14..].copy_from_slice(&next.to_le_bytes());
                        mem.write_slice(&d, GuestAddress(desc + 16 * n)).unwrap();
                    };
                    match data {
                        Some((buf, write)) => {
                            put(d0, hdr, 16, 1, (d0 + 1) as u16);
                            put(
                                d0 + 1,
                                *buf,
                                512,
                                1 | if *write { 2 } else { 0 },
                                (d0 + 2) as u16,
                            );
                            put(d0 + 2, status, 1, 2, 0);
                        }
                        None => {
                            put(d0, hdr, 16, 1, (d0 + 2) as u16);
                            put(d0 + 2, status, 1, 2, 0);
                        }
                    }
                    mem.write_obj(d0 as u16, GuestAddress(avail + 4 + 2 * i as u64))
                        .unwrap();
                    mem.write_obj((i + 1) as u16, GuestAddress(avail + 2))
                        .unwrap();
                    w(0x3000, &0u16.to_le_bytes());
                    for _ in 0..2000 {
                        if mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap() as usize > i {
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    statuses.push(mem.read_obj::<u8>(GuestAddress(status)).unwrap());
                }
                // Reset: the worker is stopped and joined on the executor; the status reads
                // the old value until then, 0 after.
                w(0x14, &[0]);
                let mut st = [0xffu8];
                for _ in 0..2000 {
                    dev.bar_read(4, 0x14, &mut st);
                    if st[0] == 0 {
                        break;
                    }
                    assert_eq!(st[0], 0xf, "status while the reset is carried out");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                statuses.push(st[0]);
                statuses
            })
            .join()
            .expect("filtered thread")
        });
        let mut back = [0u8; 512];
        mem.read_slice(&mut back, GuestAddress(0x16000)).unwrap();
        let _ = std::fs::remove_file(&img);
        assert_eq!(
            statuses,
            [0, 0, 0, 0],
            "write, read, flush statuses under the filters, then the status after the reset"
        );
        assert_eq!(back, [0xa5; 512], "the read returned what was written");
    }

    /// The VM's host services with lifecycle work on a given executor.
    struct ExecutorHost {
        vm: std::sync::Arc<crate::vm::Vm>,
        work: devices::virtio::DeviceWork,
    }

    impl devices::virtio::pci::VirtioHost for ExecutorHost {
        fn register_ioevent(&self, e: &EventFd, a: u64) -> std::io::Result<()> {
            self.vm.register_ioevent(e, a)
        }
        fn unregister_ioevent(&self, e: &EventFd, a: u64) -> std::io::Result<()> {
            self.vm.unregister_ioevent(e, a)
        }
        fn allocate_msi(&self) -> std::io::Result<(u32, EventFd)> {
            self.vm.allocate_msi()
        }
        fn release_msi(&self, g: u32, e: &EventFd) -> std::io::Result<()> {
            self.vm.release_msi(g, e)
        }
        fn set_msi_route(&self, g: u32, m: Option<(u64, u32)>) -> std::io::Result<()> {
            devices::virtio::pci::VirtioHost::set_msi_route(&*self.vm, g, m)
        }
        fn device_work(&self) -> devices::virtio::DeviceWork {
            self.work.clone()
        }
    }

    /// A device worker started from the filtered executor installs the device filter on top:
    /// the executor filter must allow that (and only narrowing is possible).
    #[test]
    fn a_worker_started_under_the_executor_filter_can_add_the_device_filter() {
        let executor = executor_filter_with(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let device = device_filter_with(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let r = std::thread::spawn(move || {
            apply(&executor).unwrap();
            std::thread::spawn(move || {
                apply(&device).map_err(|e| e.to_string())?;
                // Still filtered: a socket is refused.
                // SAFETY: plain socket(2) call, the result is only checked.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                if fd >= 0 {
                    return Err("socket allowed under the device filter".to_string());
                }
                Ok(())
            })
            .join()
            .unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(r, Ok(()));
    }
}
