//! virtio-console: one console port (no multiport), receiveq 0 and transmitq 1.
//!
//! Backends: a file (`path=`, created or truncated; guest output only, as QEMU's `-chardev
//! file`) or a unix socket the VMM listens on (`socket=`, as QEMU's `-chardev
//! socket,server=on,wait=off`): one client at a time; guest output goes to the client (and is
//! dropped while none is connected, or when the client does not read for
//! [`SEND_TIMEOUT_MS`]); what the client sends goes to the receiveq. All I/O runs on the
//! device's worker thread.
//!
//! Input flow control: at most [`INPUT_BUFFER`] bytes wait for receiveq buffers; beyond that
//! the device stops reading the socket until the driver gives buffers.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::blk::{os_error_text, read_config_bytes};
use super::worker::serve_queue;
use super::{
    types, ActivateError, Activation, ActiveQueue, QueueHandler, QueueWorker, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// Queue size the device offers.
pub const QUEUE_SIZE: u16 = 128;
/// Input bytes held while the receiveq has no buffers.
pub const INPUT_BUFFER: usize = 4096;
/// How long a socket client may block guest output before it is dropped.
pub const SEND_TIMEOUT_MS: u64 = 500;
/// Index of the receive queue (host to guest).
pub const RX: u16 = 0;
/// Index of the transmit queue (guest to host).
pub const TX: u16 = 1;

/// Bytes of guest output read from a chain per step.
const CHUNK: usize = 64 * 1024;
/// virtio_console_config: cols, rows, max_nr_ports, emerg_wr.
const CONFIG_SIZE: usize = 12;

/// Where the port goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleBackend {
    /// Guest output is written to this file (created or truncated).
    File(PathBuf),
    /// The VMM listens on this unix socket.
    Socket(PathBuf),
}

/// The backend's state, kept across driver resets (the client stays connected).
struct Io {
    out: Option<File>,
    listener: Option<UnixListener>,
    client: Option<UnixStream>,
    /// The client was dropped while writing: the listener must be watched again.
    dropped: bool,
}

impl Io {
    fn write_out(&mut self, data: &[u8]) {
        if let Some(f) = self.out.as_mut() {
            if let Err(e) = f.write_all(data) {
                tracing::warn!("virtio-console: output file: {e}");
            }
        } else if let Some(c) = self.client.as_mut() {
            if c.write_all(data).is_err() {
                // A client that hung up or does not read: drop it, take the next one.
                self.client = None;
                self.dropped = true;
            }
        }
    }
}

/// The console device.
pub struct Console {
    io: Arc<Mutex<Io>>,
    worker: QueueWorker,
}

impl Console {
    /// Opens the file or starts listening. Err: QEMU-style text naming the path.
    pub fn new(backend: &ConsoleBackend) -> Result<Self, String> {
        let io = match backend {
            ConsoleBackend::File(p) => Io {
                out: Some(File::create(p).map_err(|e| {
                    format!("Could not open '{}': {}", p.display(), os_error_text(&e))
                })?),
                listener: None,
                client: None,
                dropped: false,
            },
            ConsoleBackend::Socket(p) => Io {
                out: None,
                listener: Some(listen(p)?),
                client: None,
                dropped: false,
            },
        };
        Ok(Console {
            io: Arc::new(Mutex::new(io)),
            worker: QueueWorker::default(),
        })
    }
}

fn listen(p: &Path) -> Result<UnixListener, String> {
    // A stale socket from an earlier run is replaced, as QEMU does; other files are not.
    if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(p);
    }
    let l = UnixListener::bind(p).map_err(|e| {
        format!(
            "Failed to bind socket to {}: {}",
            p.display(),
            os_error_text(&e)
        )
    })?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(l)
}

const LISTENER: u64 = 0;
const CLIENT: u64 = 1;

struct ConsoleHandler {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    io: Arc<Mutex<Io>>,
    /// Socket backend: readiness of the listener (level) and the client (edge).
    poll: Option<Epoll>,
    input: VecDeque<u8>,
    buf: Vec<u8>,
}

impl ConsoleHandler {
    fn io(&self) -> std::sync::MutexGuard<'_, Io> {
        self.io.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn watch_listener(&self, on: bool) {
        let (Some(poll), Some(l)) = (
            &self.poll,
            self.io().listener.as_ref().map(|l| l.as_raw_fd()),
        ) else {
            return;
        };
        let op = if on {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        let _ = poll.ctl(op, l, EpollEvent::new(EventSet::IN, LISTENER));
    }

    fn watch_client(&self) {
        let (Some(poll), Some(c)) = (&self.poll, self.io().client.as_ref().map(|c| c.as_raw_fd()))
        else {
            return;
        };
        let _ = poll.ctl(
            ControlOperation::Add,
            c,
            EpollEvent::new(
                EventSet::IN | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
                CLIENT,
            ),
        );
    }

    /// Accepts a client when none is connected.
    fn accept(&mut self) {
        let accepted = {
            let mut io = self.io();
            if io.client.is_some() {
                return;
            }
            match io.listener.as_ref().map(|l| l.accept()) {
                Some(Ok((s, _))) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_write_timeout(Some(Duration::from_millis(SEND_TIMEOUT_MS)));
                    io.client = Some(s);
                    true
                }
                _ => false,
            }
        };
        if accepted {
            self.watch_listener(false);
            self.watch_client();
            self.read_client();
        }
    }

    /// Reads client input while there is room. On EOF or error the client is dropped and the
    /// listener watched again.
    fn read_client(&mut self) {
        let mut gone = false;
        {
            let room = INPUT_BUFFER.saturating_sub(self.input.len());
            let shared = self.io.clone();
            let mut io = shared.lock().unwrap_or_else(|p| p.into_inner());
            let Some(c) = io.client.as_ref() else { return };
            let fd = c.as_raw_fd();
            let mut chunk = [0u8; 1024];
            let mut room = room;
            while room > 0 {
                let want = room.min(chunk.len());
                // SAFETY: `chunk` is a writable buffer of at least `want` bytes; `fd` is the
                // client socket, open while `io` is locked.
                let n =
                    unsafe { libc::recv(fd, chunk.as_mut_ptr().cast(), want, libc::MSG_DONTWAIT) };
                if n > 0 {
                    let n = n as usize;
                    self.input.extend(&chunk[..n]);
                    room -= n;
                    continue;
                }
                let err = std::io::Error::last_os_error();
                if n < 0 && err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                gone = n == 0 || err.kind() != std::io::ErrorKind::WouldBlock;
                break;
            }
            if gone {
                io.client = None; // closing the fd removes it from the epoll set
            }
        }
        if gone {
            self.watch_listener(true);
            self.accept();
        }
    }

    /// Moves waiting input into receiveq buffers. Err: the queue is unusable.
    fn deliver(&mut self, q: &mut ActiveQueue) -> Result<(), virtio_queue::Error> {
        let mut used = false;
        while !self.input.is_empty() {
            let next = q.queue.iter(&self.mem)?.next();
            let Some(chain) = next else { break };
            let head = chain.head_index();
            let len = match chain.writer(&self.mem) {
                Ok(mut w) => {
                    let n = w.available_bytes().min(self.input.len());
                    let (a, b) = self.input.as_slices();
                    let first = n.min(a.len());
                    if w.write_all(&a[..first]).is_ok() && w.write_all(&b[..n - first]).is_ok() {
                        self.input.drain(..n);
                        n
                    } else {
                        0
                    }
                }
                Err(_) => 0,
            };
            q.queue.add_used(&self.mem, head, len as u32)?;
            used = true;
        }
        if used && q.queue.needs_notification(&self.mem)? {
            self.interrupt.signal_queue(q.index);
        }
        Ok(())
    }

    fn receive(&mut self, q: &mut ActiveQueue) -> Result<(), virtio_queue::Error> {
        self.deliver(q)?;
        // Room again: take more from the client (it will not signal data it already sent).
        self.read_client();
        self.deliver(q)
    }

    fn transmit(&mut self, q: &mut ActiveQueue) -> Result<bool, virtio_queue::Error> {
        let mem = self.mem.clone();
        let buf = &mut self.buf;
        let io = &self.io;
        serve_queue(q, &mem, |chain| {
            if let Ok(mut r) = chain.reader(&mem) {
                let mut io = io.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    match r.read(buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => io.write_out(&buf[..n]),
                    }
                }
            }
            0
        })
    }

    fn fail(&self, q: u16, e: virtio_queue::Error) {
        tracing::warn!("virtio-console: queue {q} unusable: {e}");
        self.interrupt.needs_reset();
    }
}

impl QueueHandler for ConsoleHandler {
    fn process(&mut self, q: &mut ActiveQueue) {
        let r = match q.index {
            RX => self.receive(q),
            TX => {
                let r = self.transmit(q);
                if std::mem::take(&mut self.io().dropped) {
                    self.watch_listener(true);
                    self.accept();
                }
                match r {
                    Ok(true) => {
                        self.interrupt.signal_queue(q.index);
                        Ok(())
                    }
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            _ => Ok(()),
        };
        if let Err(e) = r {
            self.fail(q.index, e);
        }
    }

    fn fd_ready(&mut self, _index: usize, queues: &mut [ActiveQueue]) {
        let mut events = [EpollEvent::default(); 2];
        let n = match &self.poll {
            Some(p) => p.wait(0, &mut events).unwrap_or(0),
            None => 0,
        };
        for ev in &events[..n] {
            match ev.data() {
                LISTENER => self.accept(),
                _ => self.read_client(),
            }
        }
        if let Some(q) = queues.iter_mut().find(|q| q.index == RX) {
            if let Err(e) = self.deliver(q) {
                self.fail(RX, e);
            }
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        types::CONSOLE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn config_size(&self) -> u64 {
        CONFIG_SIZE as u64
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[0u8; CONFIG_SIZE], offset, data);
    }

    fn activate(&self, a: Activation) -> Result<(), ActivateError> {
        let socket = self
            .io
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .listener
            .is_some();
        let poll = if socket {
            Some(Epoll::new().map_err(ActivateError::host("console poller"))?)
        } else {
            None
        };
        let fds: Vec<_> = poll.iter().map(|p| (p.as_raw_fd(), EventSet::IN)).collect();
        let handler = ConsoleHandler {
            mem: a.mem,
            interrupt: a.interrupt,
            io: self.io.clone(),
            poll,
            input: VecDeque::new(),
            buf: vec![0; CHUNK],
        };
        if handler.io().client.is_some() {
            handler.watch_client();
        } else {
            handler.watch_listener(true);
        }
        self.worker
            .start_with_fds("virtio-console", a.queues, &fds, handler)
    }

    fn reset(&self) {
        self.worker.stop();
    }

    fn release(&self) {
        self.worker.stop();
        // The output file, or the listening socket and its client, close here. The socket's
        // path stays: a device added since may listen there already.
        let mut io = self.io.lock().unwrap_or_else(|p| p.into_inner());
        io.out = None;
        io.listener = None;
        io.client = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::blk::tests::{
        memory, queue_with, used, used_idx, CountingInterrupt, F_NEXT, F_WRITE,
    };
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestAddress};

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("console-test-{}-{name}", std::process::id()))
    }

    fn handler(c: &Console, mem: &GuestMemoryMmap) -> (ConsoleHandler, Arc<CountingInterrupt>) {
        let irq = Arc::new(CountingInterrupt::default());
        let socket = c.io.lock().unwrap().listener.is_some();
        let h = ConsoleHandler {
            mem: mem.clone(),
            interrupt: irq.clone(),
            io: c.io.clone(),
            poll: socket.then(|| Epoll::new().unwrap()),
            input: VecDeque::new(),
            buf: vec![0; CHUNK],
        };
        if socket {
            h.watch_listener(true);
        }
        (h, irq)
    }

    #[test]
    fn guest_output_reaches_the_file() {
        let p = tmp("out.txt");
        let c = Console::new(&ConsoleBackend::File(p.clone())).unwrap();
        let mem = memory();
        mem.write_slice(b"hello ", GuestAddress(0x8000)).unwrap();
        mem.write_slice(b"console\n", GuestAddress(0x9000)).unwrap();
        let descs = [(0x8000, 6, F_NEXT, 1), (0x9000, 8, 0, 0)];
        let (mock, mut q) = queue_with(&mem, &descs, &[0]);
        q.index = TX;
        let (mut h, irq) = handler(&c, &mem);
        h.process(&mut q);
        assert_eq!(used_idx(&mem, &mock), 1);
        assert_eq!(used(&mem, &mock, 0), (0, 0));
        assert_eq!(irq.queue.load(Ordering::SeqCst), 1);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "hello console\n");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn malformed_output_chains_are_completed_and_skipped() {
        let p = tmp("bad.txt");
        let c = Console::new(&ConsoleBackend::File(p.clone())).unwrap();
        let mem = memory();
        mem.write_slice(b"ok", GuestAddress(0x8000)).unwrap();
        let descs = [
            (0xfff_0000, 64, 0, 0),   // outside guest memory
            (0xfffc0, 0x100, 0, 0),   // straddles the end
            (0x8000, u32::MAX, 0, 0), // absurd length
            (0x8000, 2, F_NEXT, 3),   // loops onto itself
            (0x8000, 2, F_WRITE, 0),  // nothing readable
            (0x8000, 2, F_NEXT, 300), // next beyond the table
        ];
        let (mock, mut q) = queue_with(&mem, &descs, &[0, 1, 2, 3, 4, 5]);
        q.index = TX;
        let (mut h, irq) = handler(&c, &mem);
        h.process(&mut q);
        assert_eq!(used_idx(&mem, &mock), 6);
        assert_eq!(irq.reset.load(Ordering::SeqCst), 0);
        let out = std::fs::read_to_string(&p).unwrap();
        assert!(out.len() <= 2 * 16 + 2 && out.chars().all(|c| c == 'o' || c == 'k'));
        // A head beyond the queue: needs reset, nothing else happens.
        let (_mock, mut q) = queue_with(&mem, &[], &[99]);
        q.index = TX;
        h.process(&mut q);
        assert_eq!(irq.reset.load(Ordering::SeqCst), 1);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let e = Console::new(&ConsoleBackend::File("/nonexistent/dir/out".into()))
            .err()
            .unwrap();
        assert_eq!(
            e,
            "Could not open '/nonexistent/dir/out': No such file or directory"
        );
    }

    #[test]
    fn socket_client_exchanges_data_both_ways() {
        let p = tmp("sock");
        let c = Console::new(&ConsoleBackend::Socket(p.clone())).unwrap();
        let mem = memory();
        let (mut h, irq) = handler(&c, &mem);
        // Output before any client is dropped.
        mem.write_slice(b"lost", GuestAddress(0x8000)).unwrap();
        let (_m, mut txq) = queue_with(&mem, &[(0x8000, 4, 0, 0)], &[0]);
        txq.index = TX;
        h.process(&mut txq);
        let mut client = UnixStream::connect(&p).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // The receive queue has two 4-byte buffers.
        let (rxm, mut rxq) = queue_with(
            &mem,
            &[(0xa000, 4, F_WRITE, 0), (0xb000, 4, F_WRITE, 0)],
            &[0, 1],
        );
        rxq.index = RX;
        client.write_all(b"typed!").unwrap();
        h.fd_ready(0, std::slice::from_mut(&mut rxq)); // accept (+ read)
        h.fd_ready(0, std::slice::from_mut(&mut rxq)); // in case the data came later
        assert_eq!(used_idx(&mem, &rxm), 2);
        assert_eq!(used(&mem, &rxm, 0), (0, 4));
        assert_eq!(used(&mem, &rxm, 1), (1, 2));
        let mut got = [0u8; 6];
        mem.read_slice(&mut got[..4], GuestAddress(0xa000)).unwrap();
        mem.read_slice(&mut got[4..], GuestAddress(0xb000)).unwrap();
        assert_eq!(&got, b"typed!");
        assert!(irq.queue.load(Ordering::SeqCst) >= 1);
        // Guest output goes to the client.
        mem.write_slice(b"hi there", GuestAddress(0x8000)).unwrap();
        let (_m, mut txq) = queue_with(&mem, &[(0x8000, 8, 0, 0)], &[0]);
        txq.index = TX;
        h.process(&mut txq);
        let mut back = [0u8; 8];
        client.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hi there");
        // The client hangs up; the next guest output notices, and a new client is accepted.
        drop(client);
        let (_m, mut txq2) = queue_with(&mem, &[(0x8000, 8, 0, 0)], &[0]);
        txq2.index = TX;
        h.process(&mut txq2);
        h.process(&mut txq2);
        let mut c1 = UnixStream::connect(&p).unwrap();
        h.fd_ready(0, std::slice::from_mut(&mut rxq));
        assert!(
            c.io.lock().unwrap().client.is_some(),
            "accepted after a write error"
        );
        c1.write_all(b"!").unwrap();
        // That one leaves too (noticed by reading); another is accepted.
        drop(c1);
        h.fd_ready(0, std::slice::from_mut(&mut rxq));
        assert!(c.io.lock().unwrap().client.is_none());
        let mut c2 = UnixStream::connect(&p).unwrap();
        h.fd_ready(0, std::slice::from_mut(&mut rxq));
        assert!(c.io.lock().unwrap().client.is_some());
        h.process(&mut txq); // nothing new available: nothing sent
        c2.write_all(b"x").unwrap();
        std::fs::remove_file(p).unwrap();
    }
}
