//! Descriptor-chain targets: a split queue in guest memory (virtio-queue's `MockSplitQueue`)
//! filled from the input, handed to a device at activation. The device's worker thread serves
//! whatever is available before it looks at its stop event, so `activate` + `reset` (stop and
//! join) processes the queue exactly once.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use devices::virtio::blk::{Block, BlockConfig, SECTOR_SIZE};
use devices::virtio::console::{Console, ConsoleBackend};
use devices::virtio::net::{default_mac, Net, Tap};
use devices::virtio::rng::Rng;
use devices::virtio::testing::CountingInterrupt;
use devices::virtio::{
    Activation, ActiveQueue, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::Input;

const MEM_SIZE: u64 = 0x10_0000;
/// Where the queue structures sit.
const RING_BASE: u64 = 0x8_0000;
/// Where the input's raw bytes go (indirect tables, request headers).
const DATA_BASE: u64 = 0x1000;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

fn desc_addr(inp: &mut Input) -> u64 {
    match inp.below(8) {
        0..=3 => DATA_BASE + (inp.below(64) as u64) * 0x40,
        4 => MEM_SIZE - inp.below(0x40) as u64,
        5 => RING_BASE + inp.below(0x400) as u64,
        6 => u64::MAX - inp.below(0x100) as u64,
        _ => inp.u64(),
    }
}

fn desc_len(inp: &mut Input) -> u32 {
    match inp.below(8) {
        0 => 0,
        1 => 1,
        2 => 16,
        3 => 512,
        4 => 0x1_0000,
        5 => u32::MAX,
        6 => MEM_SIZE as u32,
        _ => u32::from(inp.u16()),
    }
}

/// Where queue `i`'s structures sit (a 256-entry queue takes less than 0x4000 bytes).
fn ring_base(i: usize) -> u64 {
    RING_BASE + 0x4000 * i as u64
}

/// Fills one split queue at `base` from `inp`: descriptors, avail ring and index, used-event
/// field. Returns the queue and whether the input asks for event-idx.
fn fill_queue<'a>(
    mem: &'a GuestMemoryMmap,
    base: u64,
    inp: &mut Input,
) -> (MockSplitQueue<'a, GuestMemoryMmap>, bool) {
    let size = inp.pick(&[16u16, 2, 1, 256, 8]);
    let mock = MockSplitQueue::create(mem, GuestAddress(base), size);
    let ndesc = 1 + inp.below(usize::from(size));
    for i in 0..ndesc {
        let addr = desc_addr(inp);
        let len = desc_len(inp);
        let flags = match inp.below(6) {
            0 => F_NEXT,
            1 => F_WRITE,
            2 => F_NEXT | F_WRITE,
            3 => F_INDIRECT,
            4 => 0,
            _ => inp.u16(),
        };
        let next = if inp.below(4) == 0 {
            inp.u16()
        } else {
            (i as u16 + 1) % size
        };
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        let _ = mock.desc_table().store(i as u16, d);
    }
    let nheads = inp.below(usize::from(size) + 1);
    for i in 0..nheads {
        let h = if inp.below(8) == 0 {
            inp.u16()
        } else {
            inp.below(ndesc) as u16
        };
        if let Ok(r) = mock.avail().ring().ref_at(i) {
            r.store(u16::to_le(h));
        }
    }
    let idx = if inp.below(16) == 0 {
        inp.u16()
    } else {
        nheads as u16
    };
    mock.avail().idx().store(u16::to_le(idx));
    if inp.bool() {
        mock.avail().idx().store(u16::to_le(idx));
    }
    let event_idx = inp.bool();
    let used_event = inp.u16();
    // The used-event field follows the avail ring.
    let _ = mem.write_obj(
        used_event,
        mock.avail_addr().unchecked_add(4 + 2 * u64::from(size)),
    );
    (mock, event_idx)
}

/// Runs `device` on `count` queues (indexes 0..count) built from `inp`: activation serves
/// each queue once, reset stops and joins the worker.
fn run_queues(device: &dyn VirtioDevice, inp: &mut Input, count: usize) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");
    let mut mocks = Vec::new();
    let mut event_idx = false;
    for i in 0..count {
        let (mock, e) = fill_queue(&mem, ring_base(i), inp);
        // The driver negotiates event-idx for every queue at once: the first queue's choice.
        if i == 0 {
            event_idx = e;
        }
        mocks.push(mock);
    }
    // The rest of the input: raw guest memory at DATA_BASE (indirect tables, headers).
    let rest = inp.rest();
    let _ = mem.write_slice(rest, GuestAddress(DATA_BASE));
    let mut queues = Vec::new();
    for (i, mock) in mocks.iter().enumerate() {
        let mut queue: Queue = match mock.create_queue() {
            Ok(q) => q,
            Err(_) => return,
        };
        virtio_queue::QueueT::set_event_idx(&mut queue, event_idx);
        queues.push(ActiveQueue {
            index: i as u16,
            queue,
            event: EventFd::new(0).expect("eventfd"),
        });
    }
    let irq = Arc::new(CountingInterrupt::default());
    let features = VIRTIO_F_VERSION_1
        | if event_idx {
            VIRTIO_RING_F_EVENT_IDX
        } else {
            0
        }
        | devices::virtio::blk::F_INDIRECT_DESC;
    let activation = Activation {
        mem: mem.clone(),
        queues,
        driver_features: features,
        interrupt: irq.clone(),
    };
    if device.activate(activation).is_ok() {
        device.reset();
    }
    // No check of the rings here: descriptors may point into them, and a device-writable
    // buffer there lets the device's own output scribble over them (what a hostile guest
    // asked for).
}

/// Runs `device` on one queue built from `inp`.
fn run_queue(device: &dyn VirtioDevice, inp: &mut Input) {
    run_queues(device, inp, 1);
}

/// A well-formed queue with one 64-byte device-writable buffer; returns (used idx, len).
fn clean_request(device: &dyn VirtioDevice) -> (u16, u32) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");
    let mock = MockSplitQueue::create(&mem, GuestAddress(RING_BASE), 16);
    let d = RawDescriptor::from(SplitDescriptor::new(DATA_BASE, 64, F_WRITE, 0));
    mock.desc_table().store(0, d).expect("descriptor");
    mock.avail().ring().ref_at(0).expect("ring").store(0);
    mock.avail().idx().store(u16::to_le(1));
    let queue: Queue = mock.create_queue().expect("queue");
    let activation = Activation {
        mem: mem.clone(),
        queues: vec![ActiveQueue {
            index: 0,
            queue,
            event: EventFd::new(0).expect("eventfd"),
        }],
        driver_features: VIRTIO_F_VERSION_1,
        interrupt: Arc::new(CountingInterrupt::default()),
    };
    device
        .activate(activation)
        .expect("activation of a clean queue");
    device.reset();
    let used = mock.used_addr();
    let idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap_or(0);
    let len: u32 = mem.read_obj(used.unchecked_add(8)).unwrap_or(0);
    (idx, len)
}

/// Target: virtio-rng's request queue.
pub fn target_virtq_rng(data: &[u8]) {
    let rng = Rng::new();
    run_queue(&rng, &mut Input::new(data));
    // The same device, reset and activated again, serves a clean request.
    assert_eq!(
        clean_request(&rng),
        (1, 64),
        "virtio-rng no longer serves a clean request after a hostile queue"
    );
}

fn image() -> Option<&'static PathBuf> {
    static IMG: OnceLock<Option<PathBuf>> = OnceLock::new();
    IMG.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("fuzz-blk-{}.img", std::process::id()));
        let f = std::fs::File::create(&p).ok()?;
        f.set_len(64 * SECTOR_SIZE).ok()?;
        Some(p)
    })
    .as_ref()
}

/// Target: virtio-blk's request queue over a 32 KiB image (read-only or not).
pub fn target_virtq_blk(data: &[u8]) {
    let Some(path) = image() else { return };
    let mut inp = Input::new(data);
    let readonly = inp.bool();
    let serial = match inp.below(3) {
        0 => None,
        1 => Some("fuzz-serial-0123456789abcdef".to_string()),
        _ => Some(String::from_utf8_lossy(inp.bytes(24)).into_owned()),
    };
    let blk = match Block::new(&BlockConfig {
        path: path.clone(),
        readonly,
        serial,
    }) {
        Ok(b) => b,
        Err(_) => return,
    };
    // Device config reads at any offset and size.
    let mut d = [0u8; 8];
    blk.read_config(inp.below(80) as u64, &mut d[..1 + inp.below(8)]);
    run_queue(&blk, &mut inp);
}

/// A clean transmit request: an empty queue 0 and, on queue 1, one 64-byte driver-readable
/// buffer (a virtio-net header and a runt frame, or console output). Returns queue 1's used
/// index.
fn clean_transmit(device: &dyn VirtioDevice) -> u16 {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");
    let rx = MockSplitQueue::create(&mem, GuestAddress(ring_base(0)), 16);
    let tx = MockSplitQueue::create(&mem, GuestAddress(ring_base(1)), 16);
    let d = RawDescriptor::from(SplitDescriptor::new(DATA_BASE, 64, 0, 0));
    tx.desc_table().store(0, d).expect("descriptor");
    tx.avail().ring().ref_at(0).expect("ring").store(0);
    tx.avail().idx().store(u16::to_le(1));
    let queues = [&rx, &tx]
        .iter()
        .enumerate()
        .map(|(i, m)| ActiveQueue {
            index: i as u16,
            queue: m.create_queue().expect("queue"),
            event: EventFd::new(0).expect("eventfd"),
        })
        .collect();
    let activation = Activation {
        mem: mem.clone(),
        queues,
        driver_features: VIRTIO_F_VERSION_1,
        interrupt: Arc::new(CountingInterrupt::default()),
    };
    device
        .activate(activation)
        .expect("activation of clean queues");
    device.reset();
    mem.read_obj(tx.used_addr().unchecked_add(2)).unwrap_or(0)
}

/// The virtio-net device of this process, over a tap `fzN<pid>` (created by the first call;
/// it stays down, so frames sent to it are dropped and none arrive). Panics when no tap can be
/// made: the target needs root (CAP_NET_ADMIN) and `/dev/net/tun`, as the vmm's own net tests.
fn net() -> &'static Net {
    static NET: OnceLock<Net> = OnceLock::new();
    NET.get_or_init(|| {
        let name = format!("fzN{}", std::process::id());
        let tap = Tap::open(&name).unwrap_or_else(|e| {
            panic!("virtq_net needs a tap (root with /dev/net/tun, `modprobe tun`): {e}")
        });
        Net::new(tap, default_mac(&name))
    })
}

/// Target: virtio-net's receive and transmit queues (any chains; transmit chains of any length
/// and layout), plus device-config reads; then the same device must complete a clean transmit
/// request after reset.
pub fn target_virtq_net(data: &[u8]) {
    let dev = net();
    let mut inp = Input::new(data);
    let mut d = [0u8; 8];
    dev.read_config(inp.below(32) as u64, &mut d[..1 + inp.below(8)]);
    run_queues(dev, &mut inp, 2);
    assert_eq!(
        clean_transmit(dev),
        1,
        "virtio-net no longer completes a clean transmit after a hostile queue"
    );
}

/// The virtio-console device of this process, writing guest output to /dev/null.
fn console() -> &'static Console {
    static CONSOLE: OnceLock<Console> = OnceLock::new();
    CONSOLE.get_or_init(|| {
        Console::new(&ConsoleBackend::File("/dev/null".into())).expect("console on /dev/null")
    })
}

/// Target: virtio-console's receive and transmit queues (file backend), plus device-config
/// reads; then the same device must complete a clean transmit request after reset.
pub fn target_virtq_console(data: &[u8]) {
    let dev = console();
    let mut inp = Input::new(data);
    let mut d = [0u8; 8];
    dev.read_config(inp.below(32) as u64, &mut d[..1 + inp.below(8)]);
    run_queues(dev, &mut inp, 2);
    assert_eq!(
        clean_transmit(dev),
        1,
        "virtio-console no longer completes a clean transmit after a hostile queue"
    );
}
