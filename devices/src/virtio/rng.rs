//! virtio-rng: one request queue; each buffer the driver makes available is filled with
//! entropy from the host's `getrandom`.

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::worker::serve_queue;
use super::{
    types, ActivateError, Activation, ActiveQueue, QueueHandler, QueueWorker, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// Queue size the device offers.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes served per request (a driver asking for more gets this much).
pub const MAX_REQUEST: usize = 64 * 1024;

/// The entropy device.
#[derive(Default)]
pub struct Rng {
    worker: QueueWorker,
}

impl Rng {
    /// A new entropy device.
    pub fn new() -> Self {
        Self::default()
    }
}

fn fill_random(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe the writable slice `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n <= 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}

struct RngHandler {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    buf: Vec<u8>,
}

impl RngHandler {
    /// Serves every available request. Err: the queue itself is unusable.
    fn serve(&mut self, q: &mut ActiveQueue) -> Result<bool, virtio_queue::Error> {
        let (mem, buf) = (&self.mem, &mut self.buf);
        serve_queue(q, mem, |chain| {
            // A chain that does not fit guest memory, loops or has no writable part gets
            // zero bytes: the request completes and the device goes on.
            match chain.writer(mem) {
                Ok(mut w) => {
                    let n = w.available_bytes().min(MAX_REQUEST);
                    let buf = &mut buf[..n];
                    if fill_random(buf) {
                        std::io::Write::write_all(&mut w, buf).map_or(0, |_| n as u32)
                    } else {
                        0
                    }
                }
                Err(_) => 0,
            }
        })
    }
}

impl QueueHandler for RngHandler {
    fn process(&mut self, q: &mut ActiveQueue) {
        let result = self.serve(q);
        self.interrupt.served("virtio-rng", q.index, result);
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        types::RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn activate(&self, a: Activation) -> Result<(), ActivateError> {
        let handler = RngHandler {
            mem: a.mem,
            interrupt: a.interrupt,
            buf: vec![0; MAX_REQUEST],
        };
        self.worker.start("virtio-rng", a.queues, handler)
    }

    fn reset(&self) {
        self.worker.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use crate::virtio::testing::CountingInterrupt;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn run(descs: &[(u64, u32, u16, u16)]) -> (GuestMemoryMmap, Arc<CountingInterrupt>, u32) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let table: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f, n)| RawDescriptor::from(SplitDescriptor::new(a, l, f, n)))
            .collect();
        mock.build_desc_chain(&table).unwrap();
        let queue = mock.create_queue().unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        let mut h = RngHandler {
            mem: mem.clone(),
            interrupt: irq.clone(),
            buf: vec![0; MAX_REQUEST],
        };
        let mut q = ActiveQueue {
            index: 0,
            queue,
            event: EventFd::new(0).unwrap(),
        };
        h.process(&mut q);
        // used ring: flags u16, idx u16, then (id u32, len u32) entries
        let used = mock.used_addr();
        let len: u32 = mem.read_obj(used.unchecked_add(8)).unwrap();
        (mem, irq, len)
    }

    use vm_memory::Address;

    #[test]
    fn fills_a_writable_buffer() {
        let (mem, irq, len) = run(&[(0x8000, 64, F_WRITE, 0)]);
        assert_eq!(len, 64);
        assert_eq!(irq.queue.load(Ordering::SeqCst), 1);
        let mut b = [0u8; 64];
        mem.read_slice(&mut b, GuestAddress(0x8000)).unwrap();
        assert!(
            b.iter().any(|&x| x != 0),
            "64 random bytes are not all zero"
        );
    }

    #[test]
    fn malformed_chains_complete_with_zero_bytes() {
        // Read-only buffer: nothing to write into.
        assert_eq!(run(&[(0x8000, 64, 0, 0)]).2, 0);
        // Buffer beyond guest memory.
        assert_eq!(run(&[(0xfff_0000, 64, F_WRITE, 0)]).2, 0);
        // A buffer straddling the end of guest memory.
        assert_eq!(run(&[(0xfffc0, 128, F_WRITE, 0)]).2, 0);
    }

    #[test]
    fn a_chain_that_leaves_the_table_stops_at_the_last_valid_buffer() {
        // "next" points outside the descriptor table: the chain ends there, the request
        // still completes (with what the valid part could take) and is signalled.
        let (_, irq, len) = run(&[(0x8000, 64, F_WRITE | F_NEXT, 99)]);
        assert!(len <= 64);
        assert_eq!(irq.queue.load(Ordering::SeqCst), 1);
        assert_eq!(irq.reset.load(Ordering::SeqCst), 0);
    }
}
