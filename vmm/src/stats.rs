//! KVM's binary statistics (`KVM_GET_STATS_FD`, Documentation/virt/kvm/api.rst): one file per
//! VM and per vCPU holding a header, an id string, descriptors (name, type, unit, base,
//! exponent, size) and the data block of `u64` values.
//!
//! The files are opened when the VM and its vCPUs are created ([`KvmStatsFile::open`]); their
//! header and descriptors are read and checked once, and every query reads only the data
//! block with one `pread` from the monitor's thread. Nothing here runs on a vCPU thread: a vCPU
//! fd moves into its thread, but its stats file is a separate file KVM keeps up to date.
//!
//! Every offset and length comes from the kernel and is checked against the bytes actually
//! read before it is used ([`parse_header`], [`parse_descriptors`], [`KvmStatsFile::read`]).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use crate::monitor::stats::{
    vcpu_qom_path, Stat, StatSchema, StatType, StatUnit, StatValue, StatsSource, StatsTarget,
    IOCTL_FAILED,
};

/// `KVM_GET_STATS_FD`: `_IO(KVMIO, 0xce)`, on a VM or a vCPU fd.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;

/// `struct kvm_stats_header`: six `u32`.
pub const HEADER_SIZE: usize = 24;
/// `struct kvm_stats_desc` without its name: flags u32, exponent s16, size u16, offset u32,
/// bucket_size u32.
pub const DESC_SIZE: usize = 16;

// Limits on what the kernel may declare, so a broken header cannot make us allocate much.
// Linux uses KVM_STATS_NAME_SIZE = 48 and has ~50 vCPU statistics.
const MAX_NAME_SIZE: u32 = 4096;
const MAX_DESCRIPTORS: u32 = 65536;
const MAX_DATA: u64 = 16 << 20;

const TYPE_MASK: u32 = 0xf;
const UNIT_SHIFT: u32 = 4;
const UNIT_MASK: u32 = 0xf << UNIT_SHIFT;
const BASE_SHIFT: u32 = 8;
const BASE_MASK: u32 = 0xf << BASE_SHIFT;

/// The header of a stats file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Always 0 so far.
    pub flags: u32,
    /// Bytes of each name (id and descriptor names), NUL included.
    pub name_size: u32,
    /// Number of descriptors.
    pub num_desc: u32,
    /// Offset of the id string.
    pub id_offset: u32,
    /// Offset of the descriptor block.
    pub desc_offset: u32,
    /// Offset of the data block.
    pub data_offset: u32,
}

/// One statistic's descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// Type, unit and base (`KVM_STATS_TYPE_*`, `KVM_STATS_UNIT_*`, `KVM_STATS_BASE_*`).
    pub flags: u32,
    /// The value is `value * base^exponent` units.
    pub exponent: i16,
    /// Number of `u64` (1, or the buckets of a histogram).
    pub size: u16,
    /// Byte offset of the first value in the data block (a multiple of 8).
    pub offset: u32,
    /// Bucket size of a linear histogram.
    pub bucket_size: u32,
    /// Name, e.g. `exits`.
    pub name: String,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses the header (the first [`HEADER_SIZE`] bytes of the file).
pub fn parse_header(b: &[u8]) -> Result<Header, String> {
    if b.len() < HEADER_SIZE {
        return Err(format!(
            "KVM stats: header of {} bytes, expected {HEADER_SIZE}",
            b.len()
        ));
    }
    let h = Header {
        flags: u32_at(b, 0),
        name_size: u32_at(b, 4),
        num_desc: u32_at(b, 8),
        id_offset: u32_at(b, 12),
        desc_offset: u32_at(b, 16),
        data_offset: u32_at(b, 20),
    };
    if h.name_size == 0 || h.name_size > MAX_NAME_SIZE {
        return Err(format!("KVM stats: name size {} out of range", h.name_size));
    }
    if h.num_desc > MAX_DESCRIPTORS {
        return Err(format!(
            "KVM stats: {} descriptors, more than {MAX_DESCRIPTORS}",
            h.num_desc
        ));
    }
    Ok(h)
}

/// Bytes of the descriptor block.
pub fn descriptors_len(h: &Header) -> usize {
    (DESC_SIZE + h.name_size as usize) * h.num_desc as usize
}

/// A NUL-terminated name in `b` (which must hold the NUL).
fn c_name(b: &[u8]) -> Result<String, String> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or("KVM stats: a name without its NUL")?;
    String::from_utf8(b[..end].to_vec()).map_err(|_| "KVM stats: a name is not UTF-8".to_string())
}

/// Parses the descriptor block `b` ([`descriptors_len`] bytes) of a file with header `h`. Each
/// descriptor's values must lie within the data block's first [`MAX_DATA`] bytes, 8-aligned.
pub fn parse_descriptors(h: &Header, b: &[u8]) -> Result<Vec<Descriptor>, String> {
    let len = descriptors_len(h);
    if b.len() < len {
        return Err(format!(
            "KVM stats: descriptor block of {} bytes, expected {len}",
            b.len()
        ));
    }
    let step = DESC_SIZE + h.name_size as usize;
    let mut out = Vec::with_capacity(h.num_desc as usize);
    for d in b[..len].chunks_exact(step) {
        let desc = Descriptor {
            flags: u32_at(d, 0),
            exponent: i16::from_ne_bytes([d[4], d[5]]),
            size: u16::from_ne_bytes([d[6], d[7]]),
            offset: u32_at(d, 8),
            bucket_size: u32_at(d, 12),
            name: c_name(&d[DESC_SIZE..])?,
        };
        let end = u64::from(desc.offset) + 8 * u64::from(desc.size);
        if !desc.offset.is_multiple_of(8) || end > MAX_DATA {
            return Err(format!(
                "KVM stats: '{}' at offset {} with {} values lies outside the data block",
                desc.name, desc.offset, desc.size
            ));
        }
        out.push(desc);
    }
    Ok(out)
}

/// Bytes of the data block the descriptors use.
pub fn data_len(descs: &[Descriptor]) -> usize {
    descs
        .iter()
        .map(|d| d.offset as usize + 8 * d.size as usize)
        .max()
        .unwrap_or(0)
}

/// The values of `d` in the data block `data` (at least [`data_len`] bytes).
pub fn values(d: &Descriptor, data: &[u8]) -> Vec<u64> {
    (0..d.size as usize)
        .map(|i| {
            let at = d.offset as usize + 8 * i;
            let mut v = [0u8; 8];
            v.copy_from_slice(&data[at..at + 8]);
            u64::from_ne_bytes(v)
        })
        .collect()
}

/// The schema of `d` as QEMU reports it (`add_kvmschema_entry`), or None for a type, unit or
/// base QEMU does not know (QEMU leaves such statistics out).
pub fn schema(d: &Descriptor) -> Option<StatSchema> {
    let (kind, bucket_size) = match d.flags & TYPE_MASK {
        0 => (StatType::Cumulative, None),
        1 => (StatType::Instant, None),
        2 => (StatType::Peak, None),
        3 => (StatType::LinearHistogram, Some(d.bucket_size)),
        4 => (StatType::Log2Histogram, None),
        _ => return None,
    };
    let unit = match (d.flags & UNIT_MASK) >> UNIT_SHIFT {
        0 => None,
        1 => Some(StatUnit::Bytes),
        2 => Some(StatUnit::Seconds),
        3 => Some(StatUnit::Cycles),
        4 => Some(StatUnit::Boolean),
        _ => return None,
    };
    let base = match (d.flags & BASE_MASK) >> BASE_SHIFT {
        0 => 10,
        1 => 2,
        _ => return None,
    };
    Some(StatSchema {
        name: d.name.clone(),
        kind,
        unit,
        // QEMU gives the base only with a non-zero exponent.
        base: (d.exponent != 0).then_some(base),
        exponent: d.exponent,
        bucket_size,
    })
}

/// One open stats file (of the VM or of a vCPU) with its checked header and descriptors.
#[derive(Debug)]
pub struct KvmStatsFile {
    file: File,
    header: Header,
    id: String,
    descs: Vec<Descriptor>,
    data_len: usize,
}

impl KvmStatsFile {
    /// `KVM_GET_STATS_FD` on `fd` (a VM or vCPU fd), then reads and checks the header and
    /// descriptors. Err with the reason (e.g. a KVM without binary statistics: `EINVAL` /
    /// `ENOTTY`).
    pub fn open(fd: &impl AsRawFd) -> Result<KvmStatsFile, String> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and only returns a new fd (or -1); `fd`
        // is a live KVM fd borrowed for the call.
        let raw = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
        if raw < 0 {
            return Err(format!(
                "KVM_GET_STATS_FD: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `raw` is a new fd the kernel just gave us; nothing else owns it.
        let file = unsafe { File::from_raw_fd(raw) };
        KvmStatsFile::from_file(file)
    }

    /// Reads and checks the header and descriptors of an open stats file.
    pub fn from_file(file: File) -> Result<KvmStatsFile, String> {
        let read = |len: usize, at: u32, what: &str| -> Result<Vec<u8>, String> {
            let mut b = vec![0u8; len];
            let n = read_full(&file, &mut b, u64::from(at))
                .map_err(|e| format!("KVM stats: reading the {what}: {e}"))?;
            if n != len {
                return Err(format!(
                    "KVM stats: failed to read the {what}: expected {len} bytes, got {n}"
                ));
            }
            Ok(b)
        };
        let header = parse_header(&read(HEADER_SIZE, 0, "header")?)?;
        let id = c_name(&read(header.name_size as usize, header.id_offset, "id")?)?;
        let descs = parse_descriptors(
            &header,
            &read(descriptors_len(&header), header.desc_offset, "descriptors")?,
        )?;
        let data_len = data_len(&descs);
        Ok(KvmStatsFile {
            file,
            header,
            id,
            descs,
            data_len,
        })
    }

    /// The file's id (`kvm-PID` for a VM, `kvm-PID/vcpu-N` for a vCPU).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The descriptors, in the file's order.
    pub fn descriptors(&self) -> &[Descriptor] {
        &self.descs
    }

    /// Reads the data block now: every statistic QEMU would report, in descriptor order, with
    /// its schema and value (a boolean for boolean units, a scalar for one value, else the
    /// list of buckets).
    pub fn read(&self) -> Result<Vec<Stat>, String> {
        let mut data = vec![0u8; self.data_len];
        let n = read_full(&self.file, &mut data, u64::from(self.header.data_offset))
            .map_err(|e| format!("KVM stats: reading data: {e}"))?;
        if n != data.len() {
            return Err(format!(
                "KVM stats: failed to read data: expected {} actual {n}",
                data.len()
            ));
        }
        Ok(stats_of(&self.descs, &data))
    }
}

/// The statistics in `data` (at least [`data_len`] bytes) described by `descs`.
pub fn stats_of(descs: &[Descriptor], data: &[u8]) -> Vec<Stat> {
    descs
        .iter()
        .filter_map(|d| {
            let schema = schema(d)?;
            let v = values(d, data);
            let value = if schema.unit == Some(StatUnit::Boolean) {
                StatValue::Boolean(v.first().is_some_and(|&x| x != 0))
            } else if d.size == 1 {
                StatValue::Scalar(v[0])
            } else {
                StatValue::List(v)
            };
            Some(Stat { schema, value })
        })
        .collect()
}

/// pread until `buf` is full or end of file; returns the bytes read.
fn read_full(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], at + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The statistics files of one run of the guest: the VM's and each vCPU's (in vCPU order), or
/// why they could not be opened.
#[derive(Debug)]
pub struct GuestStats {
    /// The VM's file.
    pub vm: Result<KvmStatsFile, String>,
    /// Each vCPU's file, by vCPU index.
    pub vcpus: Vec<Result<KvmStatsFile, String>>,
}

impl GuestStats {
    /// Reads the statistics of the VM, or of every vCPU (with its QOM path, in vCPU order).
    /// Err with QEMU's text ([`IOCTL_FAILED`]) when a file could not be opened, or with the
    /// read error.
    pub fn read(&self, target: StatsTarget) -> Result<Vec<StatsSource>, String> {
        let files: Vec<(Option<String>, &Result<KvmStatsFile, String>)> = match target {
            StatsTarget::Vm => vec![(None, &self.vm)],
            StatsTarget::Vcpu => self
                .vcpus
                .iter()
                .enumerate()
                .map(|(i, f)| (Some(vcpu_qom_path(i as u32)), f))
                .collect(),
        };
        files
            .into_iter()
            .map(|(qom_path, f)| {
                let f = f.as_ref().map_err(|_| IOCTL_FAILED.to_string())?;
                Ok(StatsSource {
                    qom_path,
                    stats: f.read()?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const NAME: usize = 16;

    /// A stats file as KVM lays it out: header, id, descriptors, data.
    fn image(descs: &[(u32, i16, u16, u32, u32, &str)], data: &[u64]) -> Vec<u8> {
        let id_offset = HEADER_SIZE;
        let desc_offset = id_offset + NAME;
        let data_offset = desc_offset + descs.len() * (DESC_SIZE + NAME);
        let mut b = Vec::new();
        for v in [
            0,
            NAME as u32,
            descs.len() as u32,
            id_offset as u32,
            desc_offset as u32,
            data_offset as u32,
        ] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        let name = |s: &str, b: &mut Vec<u8>| {
            let mut n = [0u8; NAME];
            n[..s.len()].copy_from_slice(s.as_bytes());
            b.extend_from_slice(&n);
        };
        name("kvm-1/vcpu-0", &mut b);
        for &(flags, exp, size, offset, bucket, n) in descs {
            b.extend_from_slice(&flags.to_ne_bytes());
            b.extend_from_slice(&exp.to_ne_bytes());
            b.extend_from_slice(&size.to_ne_bytes());
            b.extend_from_slice(&offset.to_ne_bytes());
            b.extend_from_slice(&bucket.to_ne_bytes());
            name(n, &mut b);
        }
        for v in data {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b
    }

    fn sample() -> Vec<u8> {
        image(
            &[
                (0x00, 0, 1, 0, 0, "exits"),
                (0x20, -9, 1, 8, 0, "halt_wait_ns"),
                (0x41, 0, 1, 16, 0, "blocking"),
                (0x24, -9, 3, 24, 0, "halt_wait_hist"),
                (0x03, 0, 2, 48, 7, "lin_hist"),
                (0x19, 0, 1, 64, 0, "unknown_type"),
                (0x112, 10, 1, 72, 0, "peak_bytes"),
            ],
            &[44731, 123, 1, 5, 6, 7, 8, 9, 99, 4096],
        )
    }

    fn file_of(bytes: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!(
            "vmm-stats-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        let f = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn parses_a_hand_made_file() {
        let s = KvmStatsFile::from_file(file_of(&sample())).unwrap();
        assert_eq!(s.id(), "kvm-1/vcpu-0");
        assert_eq!(s.descriptors().len(), 7);
        assert_eq!(s.descriptors()[3].name, "halt_wait_hist");
        assert_eq!(s.descriptors()[3].exponent, -9);
        let stats = s.read().unwrap();
        // The descriptor with an unknown type is left out, as QEMU does.
        let names: Vec<&str> = stats.iter().map(|s| s.schema.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "exits",
                "halt_wait_ns",
                "blocking",
                "halt_wait_hist",
                "lin_hist",
                "peak_bytes"
            ]
        );
        assert_eq!(stats[0].value, StatValue::Scalar(44731));
        assert_eq!(stats[0].schema.kind, StatType::Cumulative);
        assert_eq!(stats[0].schema.unit, None);
        assert_eq!(stats[0].schema.base, None);
        assert_eq!(stats[1].schema.unit, Some(StatUnit::Seconds));
        assert_eq!(stats[1].schema.base, Some(10));
        assert_eq!(stats[2].value, StatValue::Boolean(true));
        assert_eq!(stats[2].schema.kind, StatType::Instant);
        assert_eq!(stats[3].value, StatValue::List(vec![5, 6, 7]));
        assert_eq!(stats[3].schema.kind, StatType::Log2Histogram);
        assert_eq!(stats[4].value, StatValue::List(vec![8, 9]));
        assert_eq!(stats[4].schema.bucket_size, Some(7));
        assert_eq!(stats[5].schema.kind, StatType::Peak);
        assert_eq!(stats[5].schema.unit, Some(StatUnit::Bytes));
        assert_eq!(stats[5].schema.base, Some(2));
        assert_eq!(stats[5].value, StatValue::Scalar(4096));
    }

    #[test]
    fn short_or_inconsistent_files_are_refused() {
        let good = sample();
        // Cut in the header, in the descriptors, in the data.
        for cut in [10, HEADER_SIZE + NAME + 20, good.len() - 4] {
            let e = KvmStatsFile::from_file(file_of(&good[..cut]))
                .and_then(|s| s.read())
                .unwrap_err();
            assert!(e.starts_with("KVM stats: "), "{cut}: {e}");
        }
        // A name without its NUL.
        let mut b = good.clone();
        let at = HEADER_SIZE + NAME + DESC_SIZE;
        b[at..at + NAME].fill(b'x');
        assert!(KvmStatsFile::from_file(file_of(&b))
            .unwrap_err()
            .contains("NUL"));
        // A descriptor pointing far outside any data block, or misaligned.
        for offset in [u32::MAX - 7, 3] {
            let mut b = good.clone();
            let at = HEADER_SIZE + NAME + 8;
            b[at..at + 4].copy_from_slice(&offset.to_ne_bytes());
            let e = KvmStatsFile::from_file(file_of(&b)).unwrap_err();
            assert!(e.contains("outside the data block"), "{e}");
        }
        // Absurd sizes in the header.
        let mut h = good[..HEADER_SIZE].to_vec();
        h[4..8].copy_from_slice(&0u32.to_ne_bytes());
        assert!(parse_header(&h).is_err());
        h[4..8].copy_from_slice(&16u32.to_ne_bytes());
        h[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_header(&h).is_err());
    }

    /// The real thing, on this host's KVM: a VM's and a vCPU's file open and read, and hold
    /// the statistics every x86 KVM has.
    #[test]
    fn reads_this_hosts_kvm() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let vm_stats = KvmStatsFile::open(&vm).expect("VM stats");
        assert!(vm_stats.id().starts_with("kvm-"), "{}", vm_stats.id());
        let v = KvmStatsFile::open(&vcpu).expect("vCPU stats");
        assert!(v.id().ends_with("/vcpu-0"), "{}", v.id());
        let stats = v.read().unwrap();
        for name in ["exits", "io_exits", "pf_fixed", "halt_exits"] {
            let s = stats
                .iter()
                .find(|s| s.schema.name == name)
                .unwrap_or_else(|| panic!("no {name}"));
            assert_eq!(s.value, StatValue::Scalar(0), "{name} before any KVM_RUN");
        }
    }
}
