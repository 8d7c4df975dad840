//! virtio-net over a TAP interface: receiveq 0 (tap to guest) and transmitq 1 (guest to tap).
//!
//! The tap is opened through `/dev/net/tun` (`TUNSETIFF` with `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`; creating an interface needs CAP_NET_ADMIN) with a 12-byte virtio-net header,
//! the guest's own header format, and no offloads. Frames move on the device's worker thread:
//! the tap fd is watched edge-triggered and read until it is empty or the guest has no receive
//! buffers left (a frame read meanwhile waits for the next buffer); new receive buffers make
//! the device read the tap again.
//!
//! Guest-memory safety: a transmit chain that does not fit guest memory or is longer than a
//! frame is completed and dropped; a receive buffer that is unusable is completed with length
//! 0 and the frame goes to the next one; a receive buffer too small for the frame is returned
//! unused and the frame dropped.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::blk::{os_error_text, read_config_bytes};
use super::worker::serve_queue;
use super::{
    types, ActivateError, Activation, ActiveQueue, QueueHandler, QueueWorker, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// Queue size the device offers.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX: u16 = 0;
/// Index of the transmit queue.
pub const TX: u16 = 1;
/// `VIRTIO_NET_F_MAC`: the config holds the MAC address.
pub const F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_STATUS`: the config holds the link status.
pub const F_STATUS: u64 = 1 << 16;
/// `struct virtio_net_hdr_v1` (with `num_buffers`): every frame starts with one.
pub const HDR_LEN: usize = 12;
/// Largest frame (without header) we move: 64 KiB plus an Ethernet and a VLAN header.
pub const MAX_FRAME: usize = 65536 + 14 + 4;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Longest interface name (IFNAMSIZ less the NUL).
pub const MAX_IFNAME: usize = 15;

/// config: mac[6], status u16, max_virtqueue_pairs u16, mtu u16.
const CONFIG_SIZE: usize = 12;
const LINK_UP: u16 = 1;

/// A TAP interface opened through /dev/net/tun.
pub struct Tap {
    file: File,
    name: String,
}

/// Whether `name` can name a network interface.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

impl Tap {
    /// Opens (creating it when it does not exist) the tap interface `name`. Err: QEMU's
    /// wording ("could not configure /dev/net/tun (NAME): REASON").
    pub fn open(name: &str) -> Result<Tap, String> {
        if !valid_ifname(name) {
            return Err(format!("invalid tap interface name '{name}'"));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| format!("could not open /dev/net/tun: {}", os_error_text(&e)))?;
        let mut ifr = [0u8; 40]; // struct ifreq: name[16], then the union (flags: short)
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        let err = |what: &str| {
            format!(
                "could not configure /dev/net/tun ({name}): {what}{}",
                os_error_text(&std::io::Error::last_os_error())
            )
        };
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; `ifr` is 40 bytes, its size.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) } < 0 {
            return Err(err(""));
        }
        let hdr: libc::c_int = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int from the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(err("vnet header size: "));
        }
        // SAFETY: TUNSETOFFLOAD takes the offload flags by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(err("offloads: "));
        }
        let end = ifr[..16].iter().position(|&b| b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&ifr[..end]).into_owned();
        Ok(Tap { file, name })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Parses `xx:xx:xx:xx:xx:xx`; refuses multicast addresses (the low bit of the first byte).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

/// The default MAC of device `id`: QEMU's 52:54:00 prefix and three bytes of a hash (FNV-1a)
/// of the id, so a device keeps its address as long as it keeps its id.
pub fn default_mac(id: &str) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let x = h.to_be_bytes();
    [0x52, 0x54, 0x00, x[1] ^ x[0], x[2], x[3]]
}

/// The network device.
pub struct Net {
    /// The tap; None once released ([`VirtioDevice::release`]).
    tap: Mutex<Option<Arc<Tap>>>,
    mac: [u8; 6],
    worker: QueueWorker,
}

impl Net {
    /// A device over `tap` with MAC address `mac`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Net {
            tap: Mutex::new(Some(Arc::new(tap))),
            mac,
            worker: QueueWorker::default(),
        }
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        c
    }
}

/// Where frames go to and come from (a tap, or a socket in tests).
trait Backend: Send + Sync + 'static {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize>;
    fn send(&self, buf: &[u8]) -> std::io::Result<usize>;
}

impl Backend for Tap {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }
    fn send(&self, buf: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(buf)
    }
}

struct NetHandler<B: Backend> {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    backend: Arc<B>,
    /// A frame read from the backend (header included) waiting for a receive buffer.
    rx_len: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
}

impl<B: Backend> NetHandler<B> {
    /// Moves frames from the backend into receive buffers until either runs out.
    fn receive(&mut self, q: &mut ActiveQueue) -> Result<(), virtio_queue::Error> {
        let mut used = false;
        loop {
            let len = match self.rx_len {
                Some(n) => n,
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(n) if n >= HDR_LEN => {
                        // num_buffers: one buffer per frame (no VIRTIO_NET_F_MRG_RXBUF).
                        self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
                        self.rx_len = Some(n);
                        n
                    }
                    Ok(0) => break,
                    Ok(_) => continue, // a runt: drop it
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break, // EAGAIN: empty (or the tap is down)
                },
            };
            let next = q.queue.iter(&self.mem)?.next();
            let Some(chain) = next else { break };
            let head = chain.head_index();
            match chain.writer(&self.mem) {
                Ok(mut w) if w.available_bytes() >= len => {
                    let n = if w.write_all(&self.rx_buf[..len]).is_ok() {
                        self.rx_len = None;
                        len as u32
                    } else {
                        0
                    };
                    q.queue.add_used(&self.mem, head, n)?;
                }
                Ok(w) if w.available_bytes() > 0 => {
                    // Too small for this frame: drop the frame, keep the buffer.
                    q.queue.go_to_previous_position();
                    self.rx_len = None;
                    continue;
                }
                // Unusable (or no writable part): complete it empty, the frame waits.
                _ => q.queue.add_used(&self.mem, head, 0)?,
            }
            used = true;
        }
        if used && q.queue.needs_notification(&self.mem)? {
            self.interrupt.signal_queue(q.index);
        }
        Ok(())
    }

    fn transmit(&mut self, q: &mut ActiveQueue) -> Result<bool, virtio_queue::Error> {
        let mem = self.mem.clone();
        let buf = &mut self.tx_buf;
        let backend = &self.backend;
        serve_queue(q, &mem, |chain| {
            let Ok(mut r) = chain.reader(&mem) else {
                return 0;
            };
            let len = r.available_bytes();
            if !(HDR_LEN..=HDR_LEN + MAX_FRAME).contains(&len)
                || r.read_exact(&mut buf[..len]).is_err()
            {
                return 0;
            }
            // No offloads were offered: the tap gets a plain header whatever the driver wrote.
            buf[..HDR_LEN].fill(0);
            let _ = backend.send(&buf[..len]);
            0
        })
    }

    fn fail(&self, q: u16, e: virtio_queue::Error) {
        tracing::warn!("virtio-net: queue {q} unusable: {e}");
        self.interrupt.needs_reset();
    }
}

impl<B: Backend> QueueHandler for NetHandler<B> {
    fn process(&mut self, q: &mut ActiveQueue) {
        let r = match q.index {
            RX => self.receive(q),
            TX => self.transmit(q).map(|signal| {
                if signal {
                    self.interrupt.signal_queue(TX);
                }
            }),
            _ => Ok(()),
        };
        if let Err(e) = r {
            self.fail(q.index, e);
        }
    }

    fn fd_ready(&mut self, _index: usize, queues: &mut [ActiveQueue]) {
        if let Some(q) = queues.iter_mut().find(|q| q.index == RX) {
            if let Err(e) = self.receive(q) {
                self.fail(RX, e);
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        types::NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_MAC | F_STATUS
    }

    fn config_size(&self) -> u64 {
        CONFIG_SIZE as u64
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&self, a: Activation) -> Result<(), ActivateError> {
        let tap = self
            .tap
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(ActivateError::Released)?;
        let fd = tap.file.as_raw_fd();
        let name = format!("virtio-net-{}", tap.name());
        let handler = NetHandler {
            mem: a.mem,
            interrupt: a.interrupt,
            backend: tap,
            rx_len: None,
            rx_buf: vec![0; HDR_LEN + MAX_FRAME],
            tx_buf: vec![0; HDR_LEN + MAX_FRAME],
        };
        self.worker.start_with_fds(
            &name,
            a.queues,
            &[(fd, EventSet::IN | EventSet::EDGE_TRIGGERED)],
            handler,
        )
    }

    fn reset(&self) {
        self.worker.stop();
    }

    fn release(&self) {
        self.worker.stop();
        // The worker had the only other reference: the tap is closed here.
        self.tap.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::blk::tests::{
        memory, queue_with, used, used_idx, CountingInterrupt, F_NEXT, F_WRITE,
    };
    use std::os::unix::net::UnixDatagram;
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestAddress};

    /// A datagram socket pair stands in for the tap: one datagram, one frame.
    struct Pair(UnixDatagram);

    impl Backend for Pair {
        fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.recv(buf)
        }
        fn send(&self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.send(buf)
        }
    }

    fn handler(mem: &GuestMemoryMmap) -> (NetHandler<Pair>, UnixDatagram, Arc<CountingInterrupt>) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let irq = Arc::new(CountingInterrupt::default());
        let h = NetHandler {
            mem: mem.clone(),
            interrupt: irq.clone(),
            backend: Arc::new(Pair(a)),
            rx_len: None,
            rx_buf: vec![0; HDR_LEN + MAX_FRAME],
            tx_buf: vec![0; HDR_LEN + MAX_FRAME],
        };
        (h, b, irq)
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0u8; HDR_LEN];
        f.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
        f
    }

    #[test]
    fn macs_parse_and_default_stably() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert_eq!(parse_mac("01:00:5e:00:00:01"), None, "multicast");
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(parse_mac("52-54-00-12-34-56"), None);
        assert_eq!(parse_mac("52:54:00:12:34:5g"), None);
        let a = default_mac("net0");
        assert_eq!(a, default_mac("net0"));
        assert_ne!(a, default_mac("net1"));
        assert_eq!(&a[..3], &[0x52, 0x54, 0x00]);
        assert!(valid_ifname("tap0") && !valid_ifname("") && !valid_ifname("a/b"));
        assert!(!valid_ifname("sixteen-chars-xx"));
    }

    #[test]
    fn transmit_sends_frames_and_skips_malformed_chains() {
        let mem = memory();
        let f = frame(60, 1);
        let mut dirty = f.clone();
        dirty[0] = 0xff; // a header flag the driver may not use: cleared
        mem.write_slice(&dirty[..HDR_LEN], GuestAddress(0x8000))
            .unwrap();
        mem.write_slice(&dirty[HDR_LEN..], GuestAddress(0x9000))
            .unwrap();
        let descs = [
            (0x8000, HDR_LEN as u32, F_NEXT, 1), // 0: header + frame
            (0x9000, 60, 0, 0),
            (0xfff_0000, 64, 0, 0),               // 2: outside guest memory
            (0x8000, u32::MAX, 0, 0),             // 3: absurd length
            (0x8000, 4, 0, 0),                    // 4: shorter than a header
            (0x8000, 0x20, F_NEXT, 5),            // 5: loops onto itself
            (0x8000, HDR_LEN as u32, F_WRITE, 0), // 6: nothing readable
        ];
        let (mock, mut q) = queue_with(&mem, &descs, &[0, 2, 3, 4, 5, 6]);
        q.index = TX;
        let (mut h, peer, irq) = handler(&mem);
        h.process(&mut q);
        assert_eq!(used_idx(&mem, &mock), 6);
        assert_eq!(used(&mem, &mock, 0), (0, 0));
        assert_eq!(irq.queue.load(Ordering::SeqCst), 1);
        assert_eq!(irq.reset.load(Ordering::SeqCst), 0);
        let mut got = vec![0u8; 70_000];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);
        // The looping chain (16 x 0x20 bytes, a valid size) may go out too; nothing else does.
        while let Ok(n) = peer.recv(&mut got) {
            assert_eq!(n, 16 * 0x20);
        }
    }

    #[test]
    fn receive_fills_buffers_and_waits_for_more() {
        let mem = memory();
        let (mut h, peer, irq) = handler(&mem);
        // Three frames; the guest offers: an unusable buffer, one too small, one that fits.
        let (f1, f2) = (frame(100, 7), frame(200, 9));
        peer.send(&f1).unwrap();
        peer.send(&f2).unwrap();
        let descs = [
            (0xfff_0000, 2048, F_WRITE, 0), // outside guest memory: completed with 0
            (0xa000, 2048, F_WRITE, 0),
        ];
        let (mock, mut q) = queue_with(&mem, &descs, &[0, 1]);
        q.index = RX;
        h.process(&mut q);
        assert_eq!(used_idx(&mem, &mock), 2);
        assert_eq!(used(&mem, &mock, 0), (0, 0));
        assert_eq!(used(&mem, &mock, 1), (1, f1.len() as u32));
        let mut got = vec![0u8; f1.len()];
        mem.read_slice(&mut got, GuestAddress(0xa000)).unwrap();
        assert_eq!(&got[HDR_LEN..], &f1[HDR_LEN..]);
        assert_eq!(&got[10..12], &[1, 0], "num_buffers = 1");
        assert_eq!(irq.queue.load(Ordering::SeqCst), 1);
        // f2 was read and waits; a buffer too small for it is skipped (the frame dropped).
        assert!(h.rx_len.is_some());
        let descs = [(0xb000, 64, F_WRITE, 0), (0xc000, 2048, F_WRITE, 0)];
        let (mock, mut q) = queue_with(&mem, &descs, &[0, 1]);
        q.index = RX;
        let f3 = frame(50, 3);
        peer.send(&f3).unwrap();
        h.fd_ready(0, std::slice::from_mut(&mut q));
        // f2 dropped (too big for buffer 0); f3 went into buffer 0.
        assert_eq!(used_idx(&mem, &mock), 1);
        assert_eq!(used(&mem, &mock, 0), (0, f3.len() as u32));
        assert_eq!(irq.reset.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_bad_receive_ring_needs_a_reset() {
        let mem = memory();
        let (mut h, peer, irq) = handler(&mem);
        peer.send(&frame(60, 0)).unwrap();
        let (_mock, mut q) = queue_with(&mem, &[], &[77]);
        q.index = RX;
        h.process(&mut q);
        assert_eq!(irq.reset.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn config_has_the_mac_and_link_up() {
        // Without CAP_NET_ADMIN no tap can be made; the config layout needs none.
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let n = Net {
            tap: Mutex::new(Some(Arc::new(Tap {
                file: File::open("/dev/null").unwrap(),
                name: "x".into(),
            }))),
            mac,
            worker: QueueWorker::default(),
        };
        let mut c = [0u8; 8];
        n.read_config(0, &mut c);
        assert_eq!(&c[..6], &mac);
        assert_eq!(&c[6..8], &[1, 0]);
        assert_ne!(n.features() & F_MAC, 0);
    }
}
