//! The guest console on the terminal: stdin to the UART, `Ctrl-A x` to quit (QEMU's
//! `-nographic` keys). Guest output reaches stdout through the UART itself.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use devices::legacy::Serial;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::stop::{Stop, StopReason};
use crate::Error;

/// Puts a terminal on stdin into raw mode (keys go to the guest as typed, as with QEMU's
/// `-nographic`) and restores it when dropped. Does nothing when stdin is not a terminal.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn new() -> Self {
        let fd = libc::STDIN_FILENO;
        // SAFETY: isatty/tcgetattr/tcsetattr only read and write the termios struct we own.
        unsafe {
            if libc::isatty(fd) != 1 {
                return RawTerminal(None);
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut t) != 0 {
                return RawTerminal(None);
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            t.c_oflag |= libc::OPOST | libc::ONLCR; // keep "\n" -> "\r\n" for the guest's output
            if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
                return RawTerminal(None);
            }
            RawTerminal(Some(saved))
        }
    }

    fn is_raw(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            // SAFETY: restores the attributes read in `new` on the same fd.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
        }
    }
}

/// Ctrl-A, the escape key of QEMU's console multiplexer (`Ctrl-A x` quits).
const ESCAPE: u8 = 0x01;

/// Forwards stdin to the UART until the VM stops or resets (the caller decides what a reset
/// means). On a terminal, `Ctrl-A x` ends the VM and
/// `Ctrl-A Ctrl-A` sends one Ctrl-A, as in QEMU.
pub fn console_loop(
    current_serial: &dyn Fn() -> Option<Arc<Serial>>,
    stop: &Stop,
) -> Result<StopReason, Error> {
    const STOP: u64 = 0;
    const STDIN: u64 = 1;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        stop.event().as_raw_fd(),
        EpollEvent::new(EventSet::IN, STOP),
    )?;
    // The stop event alone: what to wait on while the UART's receive FIFO is full (stdin is
    // level-triggered and would wake every wait at once, spinning this thread while the
    // guest, which needs the CPU to drain the FIFO, waits).
    let stop_only = Epoll::new()?;
    stop_only.ctl(
        ControlOperation::Add,
        stop.event().as_raw_fd(),
        EpollEvent::new(EventSet::IN, STOP),
    )?;
    // Unbuffered reads from the fd: a buffered reader could keep bytes epoll no longer reports.
    let mut input = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .ok();
    let mut stdin_open = input.as_ref().is_some_and(|f| {
        epoll
            .ctl(
                ControlOperation::Add,
                f.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STDIN),
            )
            .is_ok()
    });
    let terminal = RawTerminal::new();
    let mut escaped = false;
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        if let Some(reason) = stop.reason() {
            return Ok(reason);
        }
        // The UART of the current run of the guest (a reboot replaces it).
        let Some(serial) = current_serial() else {
            return Ok(StopReason::Error("the guest is gone".into()));
        };
        let room = serial.input_room();
        // With the FIFO full, look again in 10 ms (or at a stop) instead of reading more.
        let (waiting, timeout) = if stdin_open && room == 0 {
            (&stop_only, 10)
        } else {
            (&epoll, -1)
        };
        let n = match waiting.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        for ev in &events[..n] {
            let (STDIN, true, Some(f)) = (ev.data(), room > 0, input.as_mut()) else {
                continue;
            };
            let mut buf = [0u8; 64];
            let want = room.min(buf.len());
            match f.read(&mut buf[..want]) {
                Ok(0) | Err(_) => {
                    let _ = epoll.ctl(
                        ControlOperation::Delete,
                        f.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    stdin_open = false;
                    input = None;
                }
                Ok(k) if terminal.is_raw() => {
                    let mut out = Vec::with_capacity(k);
                    for &b in &buf[..k] {
                        match (escaped, b) {
                            (false, ESCAPE) => escaped = true,
                            (true, b'x') => {
                                stop.stop(StopReason::Quit);
                                escaped = false;
                            }
                            (true, _) => {
                                out.push(b);
                                escaped = false;
                            }
                            (false, _) => out.push(b),
                        }
                    }
                    serial.enqueue_input(&out);
                }
                Ok(k) => {
                    serial.enqueue_input(&buf[..k]);
                }
            }
        }
    }
}
