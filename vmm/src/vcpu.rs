//! The vCPU run loop: one exit from KVM to a device.
//!
//! `KVM_RUN` returns an exit; port and MMIO accesses go straight to the lock-free
//! [`devices::bus::Bus`] through this vCPU's own [`BusReader`] (no lock, no allocation, no
//! atomic read-modify-write on this path); anything that ends the VM is reported to
//! [`crate::stop::Stop`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use devices::bus::BusReader;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::stop::{Stop, StopReason};

/// Pauses and resumes the vCPUs (QMP `stop` / `cont`).
///
/// A vCPU checks [`RunGate::wait_running`] before every `KVM_RUN` (one atomic load while the
/// machine runs). To pause, the gate is closed and every vCPU thread is kicked out of `KVM_RUN`
/// with a signal until all of them report that they wait.
#[derive(Default)]
pub struct RunGate {
    running: AtomicBool,
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

    /// Blocks while the gate is closed.
    #[inline]
    pub fn wait_running(&self) {
        if self.running.load(Ordering::Acquire) {
            return;
        }
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.waiting.fetch_add(1, Ordering::AcqRel);
        while !self.running.load(Ordering::Acquire) {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        self.waiting.fetch_sub(1, Ordering::AcqRel);
    }

    /// Opens the gate: every waiting vCPU runs.
    pub fn open(&self) {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.running.store(true, Ordering::Release);
        self.cv.notify_all();
    }

    /// Closes the gate and kicks the vCPU `threads` until all of them wait (at most about a
    /// second).
    pub fn close(&self, threads: &[libc::pthread_t]) -> bool {
        self.running.store(false, Ordering::Release);
        for _ in 0..1000 {
            if self.waiting.load(Ordering::Acquire) >= threads.len() {
                return true;
            }
            for t in threads {
                // SAFETY: `t` is a live vCPU thread of this process (they never exit before
                // the process does); the kick signal has a handler.
                unsafe { libc::pthread_kill(*t, KICK_SIGNAL) };
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        false
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
            self.gate.wait_running();
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
                Ok(VcpuExit::Shutdown) => break StopReason::Reset("triple fault"),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    break match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => StopReason::Reset("system event"),
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
