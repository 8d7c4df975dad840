//! virtio-blk: one request queue over a raw image file.
//!
//! Requests: read (`IN`), write (`OUT`), flush (`fsync`), get-id (the `serial=` string). Each
//! request is a chain of a 16-byte header (type, reserved, sector) in device-readable buffers,
//! the data, and a 1-byte status in the last device-writable byte. A request whose chain does
//! not fit guest memory, is too short, runs past the end of the image or is not a whole number
//! of sectors completes with `VIRTIO_BLK_S_IOERR`; an unknown type with `VIRTIO_BLK_S_UNSUPP`.
//! A chain without even a writable status byte completes with used length 0. The file is
//! accessed with `pread`/`pwrite` on the device's worker thread only.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::worker::serve_queue;
use super::{
    types, ActivateError, Activation, ActiveQueue, QueueHandler, QueueWorker, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// Queue size the device offers.
pub const QUEUE_SIZE: u16 = 256;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of a device id (get-id request).
pub const ID_BYTES: usize = 20;

/// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` in the config is valid.
pub const F_SEG_MAX: u64 = 1 << 2;
/// `VIRTIO_BLK_F_RO`: the disk is read-only.
pub const F_RO: u64 = 1 << 5;
/// `VIRTIO_BLK_F_BLK_SIZE`: `blk_size` in the config is valid.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// `VIRTIO_BLK_F_FLUSH`: flush requests.
pub const F_FLUSH: u64 = 1 << 9;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const F_INDIRECT_DESC: u64 = 1 << 28;

/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Get the device id.
pub const T_GET_ID: u32 = 8;

/// Request status: success.
pub const S_OK: u8 = 0;
/// Request status: I/O error (also: malformed request, out of range, read-only).
pub const S_IOERR: u8 = 1;
/// Request status: unsupported request type.
pub const S_UNSUPP: u8 = 2;

/// Size of the config area we describe (QEMU's virtio_blk_config without the zoned part).
const CONFIG_SIZE: usize = 60;
/// Bytes moved between the file and guest memory per step.
const CHUNK: usize = 128 * 1024;

/// What a block device is built from.
#[derive(Debug, Clone, Default)]
pub struct BlockConfig {
    /// The raw image.
    pub path: std::path::PathBuf,
    /// Refuse writes (and open the file read-only).
    pub readonly: bool,
    /// What get-id returns (at most 20 bytes are used).
    pub serial: Option<String>,
}

/// An OS error as QEMU words it: the C library's text, without Rust's "(os error N)".
pub fn os_error_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The block device.
pub struct Block {
    /// The image; None once released ([`VirtioDevice::release`]).
    file: Mutex<Option<Arc<File>>>,
    capacity: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
    worker: QueueWorker,
}

impl Block {
    /// Opens the image. Err: QEMU's "Could not open 'PATH': REASON".
    pub fn new(cfg: &BlockConfig) -> Result<Self, String> {
        let open_err = |e: std::io::Error| {
            format!(
                "Could not open '{}': {}",
                cfg.path.display(),
                os_error_text(&e)
            )
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!cfg.readonly)
            .open(&cfg.path)
            .map_err(open_err)?;
        // The end, not the metadata length: a block device has a metadata length of 0.
        let len = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        let mut id = [0u8; ID_BYTES];
        if let Some(s) = &cfg.serial {
            let n = s.len().min(ID_BYTES);
            id[..n].copy_from_slice(&s.as_bytes()[..n]);
        }
        Ok(Block {
            file: Mutex::new(Some(Arc::new(file))),
            capacity: len / SECTOR_SIZE,
            readonly: cfg.readonly,
            id,
            worker: QueueWorker::default(),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        // size_max (8): not offered. seg_max (12): the most data buffers in one chain.
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        // geometry (16): not offered. blk_size (20).
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }
}

struct BlockHandler {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    req: Request,
}

/// What a request needs besides its chain (separate from the memory the chain borrows).
struct Request {
    file: Arc<File>,
    capacity_bytes: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
    buf: Vec<u8>,
}

impl Request {
    /// Checks that `len` bytes at `sector` are whole sectors inside the image.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let off = sector.checked_mul(SECTOR_SIZE)?;
        let end = off.checked_add(len as u64)?;
        ((len as u64).is_multiple_of(SECTOR_SIZE) && end <= self.capacity_bytes).then_some(off)
    }

    /// Runs one request; returns the used length (bytes written into the chain).
    fn handle(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let Ok(mut data_out) = chain.clone().writer(mem) else {
            return 0;
        };
        let writable = data_out.available_bytes();
        if writable == 0 {
            return 0; // nowhere to put a status
        }
        let Ok(mut status_w) = data_out.split_at(writable - 1) else {
            return 0;
        };
        let (status, data_len) = match chain.reader(mem) {
            Ok(mut r) => match r.read_obj::<[u8; 16]>() {
                Ok(h) => {
                    let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
                    let sector = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
                    self.execute(kind, sector, &mut r, &mut data_out)
                }
                Err(_) => (S_IOERR, 0),
            },
            Err(_) => (S_IOERR, 0),
        };
        match status_w.write_all(&[status]) {
            Ok(()) => data_len as u32 + 1,
            Err(_) => data_len as u32,
        }
    }

    /// Returns the status and the bytes written into the data buffers.
    fn execute(
        &mut self,
        kind: u32,
        sector: u64,
        data_in: &mut virtio_queue::Reader<'_>,
        data_out: &mut virtio_queue::Writer<'_>,
    ) -> (u8, usize) {
        match kind {
            T_IN => {
                let len = data_out.available_bytes();
                let Some(mut off) = self.range(sector, len) else {
                    return (S_IOERR, 0);
                };
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(CHUNK);
                    let buf = &mut self.buf[..n];
                    if self.file.read_exact_at(buf, off).is_err()
                        || data_out.write_all(buf).is_err()
                    {
                        return (S_IOERR, done);
                    }
                    done += n;
                    off += n as u64;
                }
                (S_OK, done)
            }
            T_OUT => {
                let len = data_in.available_bytes();
                if self.readonly {
                    return (S_IOERR, 0);
                }
                let Some(mut off) = self.range(sector, len) else {
                    return (S_IOERR, 0);
                };
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(CHUNK);
                    let buf = &mut self.buf[..n];
                    if data_in.read_exact(buf).is_err() || self.file.write_all_at(buf, off).is_err()
                    {
                        return (S_IOERR, 0);
                    }
                    done += n;
                    off += n as u64;
                }
                (S_OK, 0)
            }
            T_FLUSH => {
                if self.readonly || self.file.sync_data().is_ok() {
                    (S_OK, 0)
                } else {
                    (S_IOERR, 0)
                }
            }
            T_GET_ID => {
                let n = data_out.available_bytes().min(ID_BYTES);
                match data_out.write_all(&self.id[..n]) {
                    Ok(()) => (S_OK, n),
                    Err(_) => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }
}

impl QueueHandler for BlockHandler {
    fn process(&mut self, q: &mut ActiveQueue) {
        let req = &mut self.req;
        let mem = &self.mem;
        let result = serve_queue(q, mem, |chain| req.handle(mem, chain));
        self.interrupt.served("virtio-blk", q.index, result);
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        types::BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let ro = if self.readonly { F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_INDIRECT_DESC | ro
    }

    fn config_size(&self) -> u64 {
        CONFIG_SIZE as u64
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&self, a: Activation) -> Result<(), ActivateError> {
        let file = self
            .file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(ActivateError::Released)?;
        let handler = BlockHandler {
            mem: a.mem,
            interrupt: a.interrupt,
            req: Request {
                file,
                capacity_bytes: self.capacity * SECTOR_SIZE,
                readonly: self.readonly,
                id: self.id,
                buf: vec![0; CHUNK],
            },
        };
        self.worker.start("virtio-blk", a.queues, handler)
    }

    fn reset(&self) {
        self.worker.stop();
    }

    fn release(&self) {
        self.worker.stop();
        // The worker had the only other reference: the image is closed here.
        self.file.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Copies `config[offset..]` into `data`, zeros past its end.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if off < config.len() {
        let n = data.len().min(config.len() - off);
        data[..n].copy_from_slice(&config[off..off + n]);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::atomic::Ordering;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    pub(crate) use crate::virtio::testing::CountingInterrupt;

    pub(crate) const F_NEXT: u16 = 1;
    pub(crate) const F_WRITE: u16 = 2;
    pub(crate) const F_INDIRECT: u16 = 4;

    pub(crate) fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap()
    }

    /// A queue of 16 with `descs` (addr, len, flags, next) at the start of the table and the
    /// chain heads `heads` made available.
    pub(crate) fn queue_with<'a>(
        mem: &'a GuestMemoryMmap,
        descs: &[(u64, u32, u16, u16)],
        heads: &[u16],
    ) -> (MockSplitQueue<'a, GuestMemoryMmap>, ActiveQueue) {
        let mock = MockSplitQueue::new(mem, 16);
        for (i, &(a, l, f, n)) in descs.iter().enumerate() {
            let d = RawDescriptor::from(SplitDescriptor::new(a, l, f, n));
            mock.desc_table().store(i as u16, d).unwrap();
        }
        for (i, &h) in heads.iter().enumerate() {
            mock.avail().ring().ref_at(i).unwrap().store(u16::to_le(h));
        }
        mock.avail().idx().store(u16::to_le(heads.len() as u16));
        let queue: Queue = mock.create_queue().unwrap();
        let q = ActiveQueue {
            index: 0,
            queue,
            event: EventFd::new(0).unwrap(),
        };
        (mock, q)
    }

    /// Used ring entry `i`: (id, len).
    pub(crate) fn used(
        mem: &GuestMemoryMmap,
        mock: &MockSplitQueue<GuestMemoryMmap>,
        i: u64,
    ) -> (u32, u32) {
        let base = mock.used_addr().unchecked_add(4 + 8 * i);
        (
            mem.read_obj(base).unwrap(),
            mem.read_obj(base.unchecked_add(4)).unwrap(),
        )
    }

    pub(crate) fn used_idx(mem: &GuestMemoryMmap, mock: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
        mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap()
    }

    fn image(sectors: u64, name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("blk-test-{}-{name}.img", std::process::id()));
        let f = File::create(&p).unwrap();
        f.set_len(sectors * SECTOR_SIZE).unwrap();
        p
    }

    fn device(path: &Path, readonly: bool) -> Block {
        Block::new(&BlockConfig {
            path: path.to_path_buf(),
            readonly,
            serial: Some("disk-serial-0123456789abc".into()),
        })
        .unwrap()
    }

    fn handler(b: &Block, mem: &GuestMemoryMmap) -> (BlockHandler, Arc<CountingInterrupt>) {
        let irq = Arc::new(CountingInterrupt::default());
        let h = BlockHandler {
            mem: mem.clone(),
            interrupt: irq.clone(),
            req: Request {
                file: b.file.lock().unwrap().clone().unwrap(),
                capacity_bytes: b.capacity * SECTOR_SIZE,
                readonly: b.readonly,
                id: b.id,
                buf: vec![0; CHUNK],
            },
        };
        (h, irq)
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn status(mem: &GuestMemoryMmap, at: u64) -> u8 {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    const HDR: u64 = 0x8000;
    const DATA: u64 = 0x9000;
    const STATUS: u64 = 0xa000;

    /// One request: header, data (len, writable or not), status.
    fn request(
        b: &Block,
        mem: &GuestMemoryMmap,
        kind: u32,
        sector: u64,
        data_len: u32,
        data_flags: u16,
    ) -> (u8, u32, Arc<CountingInterrupt>) {
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        header(mem, HDR, kind, sector);
        let descs = [
            (HDR, 16, F_NEXT, 1),
            (DATA, data_len, data_flags | F_NEXT, 2),
            (STATUS, 1, F_WRITE, 0),
        ];
        let (mock, mut q) = queue_with(mem, &descs, &[0]);
        let (mut h, irq) = handler(b, mem);
        h.process(&mut q);
        assert_eq!(used_idx(mem, &mock), 1);
        let (id, len) = used(mem, &mock, 0);
        assert_eq!(id, 0);
        (status(mem, STATUS), len, irq)
    }

    #[test]
    fn missing_file_has_qemu_wording() {
        let err = Block::new(&BlockConfig {
            path: "/nonexistent/disk.img".into(),
            ..Default::default()
        })
        .err()
        .unwrap();
        assert_eq!(
            err,
            "Could not open '/nonexistent/disk.img': No such file or directory"
        );
    }

    #[test]
    fn write_then_read_back_reaches_the_file() {
        let p = image(64, "rw");
        let b = device(&p, false);
        assert_eq!(b.capacity(), 64);
        let mut cfg = [0u8; 8];
        b.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 64);
        assert_eq!(b.features() & F_RO, 0);
        let mem = memory();
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        let (s, len, irq) = request(&b, &mem, T_OUT, 2, 1024, 0);
        assert_eq!((s, len), (S_OK, 1));
        assert_eq!(irq.queue.load(Ordering::SeqCst), 1);
        let on_disk = std::fs::read(&p).unwrap();
        assert_eq!(&on_disk[1024..2048], &pattern[..]);
        // Read it back into cleared memory.
        mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        let (s, len, _) = request(&b, &mem, T_IN, 2, 1024, F_WRITE);
        assert_eq!((s, len), (S_OK, 1025));
        let mut back = vec![0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern);
        // Flush and get-id.
        assert_eq!(request(&b, &mem, T_FLUSH, 0, 0, 0).0, S_OK);
        let (s, len, _) = request(&b, &mem, T_GET_ID, 0, 20, F_WRITE);
        assert_eq!((s, len), (S_OK, 21));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"disk-serial-01234567");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn bad_requests_complete_with_an_error_status() {
        let p = image(8, "bad");
        let b = device(&p, false);
        let mem = memory();
        // Past the end, straddling the end, a sector number that overflows, a partial sector.
        assert_eq!(request(&b, &mem, T_IN, 8, 512, F_WRITE).0, S_IOERR);
        assert_eq!(request(&b, &mem, T_OUT, 7, 1024, 0).0, S_IOERR);
        assert_eq!(
            request(&b, &mem, T_IN, u64::MAX / 256, 512, F_WRITE).0,
            S_IOERR
        );
        assert_eq!(request(&b, &mem, T_OUT, 0, 100, 0).0, S_IOERR);
        // Unknown type.
        assert_eq!(request(&b, &mem, 0x1234, 0, 512, 0).0, S_UNSUPP);
        // Data buffer outside guest memory.
        let descs = [
            (HDR, 16, F_NEXT, 1),
            (0xfff_0000, 512, F_WRITE | F_NEXT, 2),
            (STATUS, 1, F_WRITE, 0),
        ];
        header(&mem, HDR, T_IN, 0);
        let (mock, mut q) = queue_with(&mem, &descs, &[0]);
        let (mut h, irq) = handler(&b, &mem);
        h.process(&mut q);
        assert_eq!(used_idx(&mem, &mock), 1);
        assert_eq!(used(&mem, &mock, 0).1, 0, "no usable status byte: length 0");
        assert_eq!(irq.reset.load(Ordering::SeqCst), 0);
        // Header outside guest memory: the status still says IOERR.
        let descs = [(0xfff_0000, 16, F_NEXT, 1), (STATUS, 1, F_WRITE, 0)];
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let (mock, mut q) = queue_with(&mem, &descs, &[0]);
        h.process(&mut q);
        assert_eq!(used(&mem, &mock, 0).1, 1);
        assert_eq!(status(&mem, STATUS), S_IOERR);
        // A header shorter than 16 bytes.
        let descs = [(HDR, 8, F_NEXT, 1), (STATUS, 1, F_WRITE, 0)];
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let (_mock, mut q) = queue_with(&mem, &descs, &[0]);
        h.process(&mut q);
        assert_eq!(status(&mem, STATUS), S_IOERR);
        // No writable descriptor at all.
        let descs = [(HDR, 16, 0, 0)];
        let (mock, mut q) = queue_with(&mem, &descs, &[0]);
        h.process(&mut q);
        assert_eq!(used(&mem, &mock, 0).1, 0);
        std::fs::remove_file(p).unwrap();
    }

    /// A tmpfs of `kib` KiB on a new directory, unmounted when dropped (also on a panic).
    struct SmallTmpfs(std::path::PathBuf);

    impl SmallTmpfs {
        fn mount(name: &str, kib: u32) -> SmallTmpfs {
            let dir = std::env::temp_dir().join(format!("blk-tmpfs-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
                .arg(&dir)
                .output()
                .unwrap_or_else(|e| panic!("cannot run mount(8): {e}"));
            assert!(
                out.status.success(),
                "this test needs a small tmpfs (tests run as root): mount on {} failed: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            SmallTmpfs(dir)
        }
    }

    impl Drop for SmallTmpfs {
        fn drop(&mut self) {
            let ok = std::process::Command::new("umount")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success())
                || std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&self.0)
                    .status()
                    .is_ok_and(|s| s.success());
            if ok {
                let _ = std::fs::remove_dir(&self.0);
            } else {
                eprintln!("umount {} failed", self.0.display());
            }
        }
    }

    #[test]
    fn a_write_to_a_full_filesystem_is_an_io_error_for_the_guest_and_the_device_goes_on() {
        let fs = SmallTmpfs::mount("full", 64);
        // A sparse image: its holes need blocks the filesystem no longer has.
        let img = fs.0.join("disk.img");
        File::create(&img)
            .unwrap()
            .set_len(2048 * SECTOR_SIZE)
            .unwrap();
        let b = device(&img, false);
        let mem = memory();
        let pattern = [0xc3u8; 4096];
        mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        assert_eq!(
            request(&b, &mem, T_OUT, 0, 4096, 0).0,
            S_OK,
            "room at first"
        );
        let filler = fs.0.join("filler");
        let mut f = File::create(&filler).unwrap();
        let err = loop {
            if let Err(e) = f.write_all(&[0u8; 4096]) {
                break e;
            }
        };
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        drop(f);

        // Into a hole: ENOSPC from the file, VIRTIO_BLK_S_IOERR to the guest, the request
        // completed (used entry, interrupt).
        let (s, len, irq) = request(&b, &mem, T_OUT, 512, 4096, 0);
        assert_eq!((s, len), (S_IOERR, 1));
        assert_eq!(irq.queue.load(Ordering::SeqCst), 1);
        // The device serves on: what was written reads back, the hole reads as zeros,
        // a flush succeeds.
        mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
        assert_eq!(request(&b, &mem, T_IN, 0, 4096, F_WRITE).0, S_OK);
        let mut back = [0u8; 4096];
        mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern);
        assert_eq!(request(&b, &mem, T_IN, 512, 4096, F_WRITE).0, S_OK);
        mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, [0u8; 4096]);
        assert_eq!(request(&b, &mem, T_FLUSH, 0, 0, 0).0, S_OK);
        // With room again the same write succeeds.
        std::fs::remove_file(&filler).unwrap();
        mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        assert_eq!(request(&b, &mem, T_OUT, 512, 4096, 0).0, S_OK);
        drop(b);
        let on_disk = std::fs::read(&img).unwrap();
        assert_eq!(&on_disk[512 * 512..512 * 512 + 4096], &pattern[..]);
    }

    #[test]
    fn readonly_disk_refuses_writes() {
        let p = image(8, "ro");
        let b = device(&p, true);
        assert_ne!(b.features() & F_RO, 0);
        let mem = memory();
        mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(request(&b, &mem, T_OUT, 0, 512, 0).0, S_IOERR);
        assert_eq!(request(&b, &mem, T_IN, 0, 512, F_WRITE).0, S_OK);
        assert!(std::fs::read(&p).unwrap().iter().all(|&x| x == 0));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn loops_and_bad_indices_neither_hang_nor_kill_the_device() {
        let p = image(8, "loop");
        let b = device(&p, false);
        let mem = memory();
        header(&mem, HDR, T_IN, 0);
        // 0 -> 1 -> 0 -> ...: the walk stops after queue-size descriptors.
        let descs = [(HDR, 16, F_NEXT, 1), (DATA, 512, F_WRITE | F_NEXT, 0)];
        let (mock, mut q) = queue_with(&mem, &descs, &[0]);
        let (mut h, irq) = handler(&b, &mem);
        h.process(&mut q);
        assert_eq!(used_idx(&mem, &mock), 1);
        assert_eq!(irq.reset.load(Ordering::SeqCst), 0);
        // A next index beyond the table.
        let descs = [(HDR, 16, F_NEXT, 200)];
        let (mock, mut q) = queue_with(&mem, &descs, &[0]);
        h.process(&mut q);
        assert_eq!(used_idx(&mem, &mock), 1);
        // An indirect table outside guest memory, and one of absurd length.
        let descs = [
            (0xfff_0000, 64, F_INDIRECT, 0),
            (0x1000, 0xffff_fff0, F_INDIRECT, 0),
        ];
        let (mock, mut q) = queue_with(&mem, &descs, &[0, 1]);
        h.process(&mut q);
        assert_eq!(used_idx(&mem, &mock), 2);
        // An absurd data length inside a chain.
        let descs = [
            (HDR, 16, F_NEXT, 1),
            (DATA, u32::MAX, F_WRITE | F_NEXT, 2),
            (STATUS, 1, F_WRITE, 0),
        ];
        let (mock, mut q) = queue_with(&mem, &descs, &[0]);
        h.process(&mut q);
        assert_eq!(used(&mem, &mock, 0).1, 0);
        assert_eq!(irq.reset.load(Ordering::SeqCst), 0);
        // A head index beyond the queue: the device needs a reset, the worker lives on.
        let (_mock, mut q) = queue_with(&mem, &[], &[500]);
        h.process(&mut q);
        assert_eq!(irq.reset.load(Ordering::SeqCst), 1);
        // An avail index far ahead of what was made available.
        let (mock, mut q) = queue_with(&mem, &[(HDR, 16, 0, 0)], &[0]);
        mock.avail().idx().store(u16::to_le(1000));
        h.process(&mut q);
        assert_eq!(irq.reset.load(Ordering::SeqCst), 2);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let p = image(3, "cfg");
        let b = device(&p, false);
        let mut d = [0xffu8; 8];
        b.read_config(0x100, &mut d);
        assert_eq!(d, [0; 8]);
        b.read_config(u64::MAX, &mut d);
        assert_eq!(d, [0; 8]);
        let mut d = [0u8; 4];
        b.read_config(CONFIG_SIZE as u64 - 2, &mut d);
        assert_eq!(d, [0; 4]);
        std::fs::remove_file(p).unwrap();
    }
}
