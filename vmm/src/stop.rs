//! Why and how the VM stops: the one place vCPU threads, devices and signals report to.
//!
//! The first reported reason wins; the main thread waits on [`Stop::event`] and ends the process
//! with [`Stop::exit_code`].

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Who or what reset the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetSource {
    /// The guest asked (i8042 pulse, ACPI reset register).
    Guest,
    /// A triple fault (KVM's shutdown exit).
    TripleFault,
    /// KVM reported a reset system event.
    SystemEvent,
    /// QMP `system_reset`.
    Qmp,
}

impl ResetSource {
    /// Whether the guest caused it (QMP `RESET`/`SHUTDOWN` events' `guest` field).
    pub fn by_guest(self) -> bool {
        !matches!(self, ResetSource::Qmp)
    }

    /// QEMU's `ShutdownCause` name for it.
    pub fn cause(self) -> &'static str {
        match self {
            ResetSource::Qmp => "host-qmp-system-reset",
            _ => "guest-reset",
        }
    }
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A reset (i8042, triple fault, ACPI reset, QMP).
    Reset(ResetSource),
    /// The guest powered off.
    PowerOff(&'static str),
    /// SIGINT / SIGTERM.
    Signal(i32),
    /// The QMP command `quit`.
    Quit,
    /// A KVM error or an exit we cannot handle; the message says what and where.
    Error(String),
}

impl StopReason {
    /// The process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::Error(_) => 1,
            _ => 0,
        }
    }
}

/// The stop signal shared by everything that can end the VM.
pub struct Stop {
    event: EventFd,
    reason: Mutex<Option<StopReason>>,
}

impl Stop {
    /// A stop signal nobody has raised yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Stop {
            event: EventFd::new(EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    /// Reports `reason`. The first report is kept, except that a reset (which the machine may
    /// turn into a reboot) gives way to any reason that ends the process.
    pub fn stop(&self, reason: StopReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        tracing::info!("stop requested: {reason:?}");
        match (&*r, &reason) {
            (None, _) => *r = Some(reason),
            (Some(StopReason::Reset(_)), StopReason::Reset(_)) => {}
            (Some(StopReason::Reset(_)), _) => *r = Some(reason),
            _ => {}
        }
        let _ = self.event.write(1);
    }

    /// Takes a pending reset (the machine rebooted): the stop signal is clear again. Any
    /// other reason stays.
    pub fn take_reset(&self) -> Option<ResetSource> {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        match *r {
            Some(StopReason::Reset(source)) => {
                *r = None;
                let _ = self.event.read();
                Some(source)
            }
            _ => None,
        }
    }

    /// The event the main thread waits on.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// The first reported reason, if any.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = Stop::new().unwrap();
        assert_eq!(s.reason(), None);
        s.stop(StopReason::Error("boom".into()));
        s.stop(StopReason::Reset(ResetSource::Guest));
        assert_eq!(s.reason(), Some(StopReason::Error("boom".into())));
        assert_eq!(s.reason().unwrap().exit_code(), 1);
        assert_eq!(s.event().read().unwrap(), 2);
    }

    #[test]
    fn a_reset_gives_way_to_an_ending_and_can_be_taken() {
        let s = Stop::new().unwrap();
        s.stop(StopReason::Reset(ResetSource::TripleFault));
        s.stop(StopReason::Reset(ResetSource::Qmp));
        assert_eq!(s.take_reset(), Some(ResetSource::TripleFault));
        assert_eq!(s.reason(), None);
        s.stop(StopReason::Reset(ResetSource::Guest));
        s.stop(StopReason::Signal(15));
        assert_eq!(s.take_reset(), None);
        assert_eq!(s.reason(), Some(StopReason::Signal(15)));
    }
}
