//! The 8250 UART at 0x3f8 (COM1), IRQ 4, backed by vm-superio.

use std::io::Write;
use std::sync::Mutex;

use vm_superio::serial::NoEvents;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::EventFdTrigger;

/// COM1's base port.
pub const SERIAL_PORT: u64 = 0x3f8;
/// Number of ports an 8250 decodes.
pub const SERIAL_PORT_LEN: u64 = 8;
/// COM1's legacy IRQ line (GSI).
pub const SERIAL_IRQ: u32 = 4;

type Uart = vm_superio::Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>;

/// An 8250 UART. Its state is behind its own narrow lock (the console is not a hot path).
pub struct Serial {
    inner: Mutex<Uart>,
}

impl Serial {
    /// A UART that writes the guest's output to `out` and raises `irq` for interrupts.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Serial {
            inner: Mutex::new(vm_superio::Serial::new(EventFdTrigger(irq), out)),
        }
    }

    /// Queues host input for the guest. Returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        match self.inner.lock() {
            Ok(mut s) => s.enqueue_raw_bytes(bytes).unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        match self.inner.lock() {
            Ok(s) => s.fifo_capacity(),
            Err(_) => 0,
        }
    }
}

impl BusDevice for Serial {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = match self.inner.lock() {
            Ok(mut s) => s.read(offset as u8),
            Err(_) => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        if let (Some(&v), Ok(mut s)) = (data.first(), self.inner.lock()) {
            if let Err(e) = s.write(offset as u8, v) {
                tracing::debug!("serial write failed: {e:?}");
            }
        }
    }
}
