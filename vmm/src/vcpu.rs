//! The vCPU run loop: one exit from KVM to a device.
//!
//! `KVM_RUN` returns an exit; port and MMIO accesses go straight to the lock-free
//! [`devices::bus::Bus`] through this vCPU's own [`BusReader`] (no lock, no allocation, no
//! atomic read-modify-write on this path); anything that ends the VM is reported to
//! [`crate::stop::Stop`].

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use devices::bus::BusReader;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::stop::{ResetSource, Stop, StopReason};

/// Pauses, resumes and ends the vCPUs (QMP `stop` / `cont`, reboot, exit).
///
/// A vCPU checks [`RunGate::wait_running`] before every `KVM_RUN` (one atomic load while the
/// machine runs). To pause, the gate is closed and every live vCPU thread is kicked out of
/// `KVM_RUN` with a signal until all of them report that they wait. To end the vCPUs, the gate
/// is told to quit: every vCPU returns from its loop at its next check.
#[derive(Default)]
pub struct RunGate {
    running: AtomicBool,
    quit: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
    waiting: AtomicUsize,
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub const KICK_SIGNAL: i32 = libc::SIGUSR1;

extern "C" fn kick_handler(_: i32) {}

/// Installs the (empty) handler of [`KICK_SIGNAL`], so the signal interrupts `KVM_RUN`
/// instead of killing the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: the handler is an empty extern "C" fn, async-signal-safe; the sigaction struct is
    // fully initialised before use.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = kick_handler as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(KICK_SIGNAL, &sa, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl RunGate {
    /// A closed gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Blocks while the gate is closed. Returns false when the vCPU must end its loop.
    #[inline]
    pub fn wait_running(&self) -> bool {
        if self.running.load(Ordering::Acquire) {
            return true;
        }
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.waiting.fetch_add(1, Ordering::AcqRel);
        while !self.running.load(Ordering::Acquire) && !self.quit.load(Ordering::Acquire) {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        !self.quit.load(Ordering::Acquire)
    }

    /// Opens the gate: every waiting vCPU runs.
    pub fn open(&self) {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.running.store(true, Ordering::Release);
        self.cv.notify_all();
    }

    /// Closes the gate for good: every vCPU leaves its loop at its next check.
    fn quit(&self) {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.quit.store(true, Ordering::Release);
        self.running.store(false, Ordering::Release);
        self.cv.notify_all();
    }
}

/// The vCPUs of one guest run: created with the machine, started once, paused and resumed
/// through one [`RunGate`], ended and joined on reboot.
///
/// Invariant: a vCPU thread is only ever signalled while its `JoinHandle` is held here and
/// the thread has not finished. A held, unjoined handle keeps its `pthread_t` valid (the thread
/// is not detached), so a thread that returns between the check and the signal is still a
/// valid target; a joined one is never signalled again.
pub struct VcpuSet {
    gate: Arc<RunGate>,
    created: Mutex<Vec<Vcpu>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl VcpuSet {
    /// Created vCPUs sharing `gate`, not running yet.
    pub fn new(gate: Arc<RunGate>, vcpus: Vec<Vcpu>) -> Self {
        VcpuSet {
            gate,
            created: Mutex::new(vcpus),
            threads: Mutex::new(Vec::new()),
        }
    }

    /// Starts a thread for each vCPU that has none yet (each applies `filter`, seccomp, first,
    /// reporting a failure to `stop`), then opens the gate: starts or resumes every vCPU.
    pub fn start(
        &self,
        filter: Option<crate::seccomp::Filter>,
        stop: &Arc<Stop>,
    ) -> std::io::Result<()> {
        let vcpus = std::mem::take(&mut *self.created.lock().unwrap_or_else(|p| p.into_inner()));
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        for v in vcpus {
            let filter = filter.clone();
            let stop = stop.clone();
            let h = std::thread::Builder::new()
                .name(format!("vcpu{}", v.id))
                .spawn(move || {
                    if let Some(f) = filter {
                        if let Err(e) = crate::seccomp::apply(&f) {
                            stop.stop(StopReason::Error(format!("seccomp: {e}")));
                            return;
                        }
                    }
                    v.run()
                })?;
            threads.push(h);
        }
        drop(threads);
        self.gate.open();
        Ok(())
    }

    /// Closes the gate and kicks the live vCPU threads until all of them wait (at most about a
    /// second). A vCPU whose thread has returned is not waited for, nor signalled.
    pub fn pause(&self) -> bool {
        self.gate.running.store(false, Ordering::Release);
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..1000 {
            let live: Vec<&JoinHandle<()>> = threads.iter().filter(|h| !h.is_finished()).collect();
            if self.gate.waiting.load(Ordering::Acquire) >= live.len() {
                return true;
            }
            for h in live {
                // SAFETY: `h` is held and not joined, so its pthread_t is valid (see the type's
                // invariant); the kick signal has a handler.
                unsafe { libc::pthread_kill(h.as_pthread_t(), KICK_SIGNAL) };
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        false
    }

    /// Ends every vCPU thread and joins it (for a reboot or the end of the process). Threads
    /// inside `KVM_RUN` are kicked out; none is signalled after it has been joined.
    pub fn end(&self) {
        self.gate.quit();
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        while threads.iter().any(|h| !h.is_finished()) {
            for h in threads.iter().filter(|h| !h.is_finished()) {
                // SAFETY: as in `pause`: held, unjoined handle.
                unsafe { libc::pthread_kill(h.as_pthread_t(), KICK_SIGNAL) };
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        for h in threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// What a vCPU thread needs to run.
pub struct Vcpu {
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Its index.
    pub id: u8,
    /// This vCPU's reader of the port I/O bus.
    pub pio: BusReader,
    /// This vCPU's reader of the MMIO bus (BARs, ECAM).
    pub mmio: BusReader,
    /// Guest memory, to show the faulting instruction in error reports.
    pub mem: GuestMemoryMmap,
    /// Where to report the end of the VM.
    pub stop: Arc<Stop>,
    /// Pause / resume.
    pub gate: Arc<RunGate>,
}

impl Vcpu {
    /// Runs the guest until something ends the VM; reports why to `stop`.
    pub fn run(mut self) {
        let reason = loop {
            if !self.gate.wait_running() {
                return;
            }
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                        tracing::debug!("unclaimed port read {port:#x}");
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !self.pio.write(u64::from(port), data) {
                        tracing::debug!("unclaimed port write {port:#x}");
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                        tracing::debug!("unclaimed MMIO read {addr:#x}");
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !self.mmio.write(addr, data) {
                        tracing::debug!("unclaimed MMIO write {addr:#x}");
                    }
                }
                Ok(VcpuExit::Shutdown) => break StopReason::Reset(ResetSource::TripleFault),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    break match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                            StopReason::Reset(ResetSource::SystemEvent)
                        }
                        _ => StopReason::PowerOff("system event"),
                    }
                }
                Ok(VcpuExit::Hlt) => break StopReason::PowerOff("hlt"),
                Ok(VcpuExit::Intr) => continue,
                Ok(VcpuExit::InternalError) => {
                    let suberror = self.fd.get_kvm_run().__bindgen_anon_1;
                    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the exit
                    // union is the one KVM filled in.
                    let sub = unsafe { suberror.internal.suberror };
                    break StopReason::Error(self.describe(&format!(
                        "KVM internal error (suberror {sub}{})",
                        if sub == 1 { ": emulation failure" } else { "" }
                    )));
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    break StopReason::Error(self.describe(&format!(
                        "KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                    )))
                }
                Ok(other) => {
                    let what = format!("unhandled exit {other:?}");
                    break StopReason::Error(self.describe(&what));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => break StopReason::Error(self.describe(&format!("KVM_RUN failed: {e}"))),
            }
        };
        self.stop.stop(reason);
    }

    /// "what: vCPU n at RIP (instruction bytes)".
    fn describe(&self, what: &str) -> String {
        let Ok(regs) = self.fd.get_regs() else {
            return format!("{what} on vCPU {}", self.id);
        };
        let sregs = self.fd.get_sregs().ok();
        let linear = regs.rip.wrapping_add(sregs.map_or(0, |s| s.cs.base));
        let bytes = self
            .fd
            .translate_gva(linear)
            .ok()
            .filter(|t| t.valid != 0)
            .and_then(|t| {
                let mut b = [0u8; 15];
                self.mem
                    .read_slice(&mut b, GuestAddress(t.physical_address))
                    .ok()
                    .map(|_| b)
            });
        let insn = match bytes {
            Some(b) => b
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" "),
            None => "unreadable".into(),
        };
        format!(
            "{what} on vCPU {} at RIP {:#x} (instruction bytes: {insn})",
            self.id, regs.rip
        )
    }
}
