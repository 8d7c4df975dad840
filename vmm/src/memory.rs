//! Guest RAM on the host: anonymous memory aligned to 2 MiB and advised for transparent huge
//! pages (`madvise(MADV_HUGEPAGE)`), as QEMU backs its RAM (`qemu_ram_mmap`, aligned to
//! `QEMU_VMALLOC_ALIGN`). The guest cannot see any of this: the address map
//! ([`crate::layout::ram_ranges`]) is unchanged.
//!
//! Why: KVM maps guest memory with 2 MiB nested page table entries only where the host backs
//! it with a huge page *and* the host address and the guest address agree modulo 2 MiB. With
//! 4 KiB host pages (or a misaligned mapping) every 4 KiB of memory the guest touches costs a
//! nested page fault (`pf_fixed`), tens of thousands for a Linux boot (issue 14).
//!
//! vm-memory's own anonymous mappings cannot be aligned, so each range is mapped here (with
//! 2 MiB to spare, the excess unmapped) and handed to vm-memory as a region it does not own.
//! The mapping is unmapped only once no [`GuestMemoryMmap`] (or anything else) holds its
//! region any more: [`Pool`] keeps one `Arc` of each region and frees those only it still
//! holds, whenever guest RAM is allocated again (e.g. at a reboot).
//!
//! [`RamBacking`] has QEMU's two options on top (`-mem-path`, `-mem-prealloc`): RAM as a file
//! in a directory (hugetlbfs gives huge pages that are reserved when the RAM is mapped, so a
//! host short of them refuses to start instead of failing later), and every page touched
//! before the guest runs (no fault later while the guest runs; a host short of memory fails at
//! start).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::Error;

/// Huge pages are 2 MiB on x86-64.
pub const HUGE_PAGE: usize = 2 << 20;

/// `statfs` magic of hugetlbfs.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// How guest RAM is backed on the host (QEMU's `-mem-path` and `-mem-prealloc`). The guest
/// cannot tell the difference: this is not ABI and is not recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RamBacking {
    /// RAM is a file in this directory (created unlinked), mapped private like QEMU's
    /// `-mem-path` without `share=on`. On hugetlbfs its huge pages are reserved at start.
    pub mem_path: Option<PathBuf>,
    /// Every page is allocated before the guest runs (`MADV_POPULATE_WRITE`).
    pub prealloc: bool,
}

/// What backs one RAM range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Thp {
    /// A file on hugetlbfs: huge pages of this size, reserved when mapped.
    HugeTlbFs {
        /// Page size of the file system.
        page_size: u64,
    },
    /// A file on another file system (`--mem-path`), 2 MiB aligned and advised like anonymous
    /// memory.
    File {
        /// The file system's block size.
        block_size: u64,
    },
    /// `madvise(MADV_HUGEPAGE)` succeeded; the host's THP mode (`always`, `madvise`, `never`,
    /// from /sys/kernel/mm/transparent_hugepage/enabled) says whether it takes effect.
    Advised {
        /// The selected mode, e.g. `madvise`; empty if the file could not be read.
        mode: String,
    },
    /// The host has no transparent huge pages (madvise failed): 4 KiB pages.
    Unavailable(String),
}

/// One guest RAM range as it is backed.
#[derive(Debug, Clone)]
pub struct RamRange {
    /// Guest address.
    pub guest: u64,
    /// Host address (2 MiB aligned).
    pub host: usize,
    /// Size in bytes.
    pub size: usize,
    /// Huge pages.
    pub thp: Thp,
}

/// A mapping made here, and the region vm-memory sees of it.
struct Mapping {
    region: Arc<MmapRegion>,
    addr: usize,
    len: usize,
}

/// Every guest RAM mapping still mapped.
struct Pool(Vec<Mapping>);

static POOL: Mutex<Pool> = Mutex::new(Pool(Vec::new()));

impl Pool {
    /// Unmaps every mapping whose region nobody but the pool holds any more.
    fn sweep(&mut self) {
        self.0.retain(|m| {
            if Arc::strong_count(&m.region) > 1 {
                return true;
            }
            // SAFETY: only the pool holds the region (its one strong reference, no weak ones
            // are made), so no GuestMemoryMmap, vCPU or device can reach the memory any more,
            // and no KVM VM uses it: a VM's memory slots are only registered by `Vm`, which
            // holds a GuestMemoryMmap (and so the region) for as long as its fd is open.
            // `addr`/`len` are exactly the mapping made in `map_aligned`.
            unsafe { libc::munmap(m.addr as *mut libc::c_void, m.len) };
            false
        });
    }
}

/// The host's transparent huge page mode (the bracketed word), or "".
pub fn thp_mode() -> String {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .and_then(|s| {
            let start = s.find('[')? + 1;
            let end = s[start..].find(']')? + start;
            Some(s[start..end].to_string())
        })
        .unwrap_or_default()
}

/// Maps `size` bytes at a 2 MiB-aligned address: anonymous memory, or `file` (private, from
/// offset 0) when given. Returns the address.
fn map_aligned(size: usize, file: Option<&File>) -> Result<usize, Error> {
    let len = size
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| Error::MemoryAlloc(format!("{size} bytes")))?;
    // SAFETY: a new anonymous private mapping at an address of the kernel's choosing: it
    // touches no existing memory.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(Error::MemoryAlloc(format!(
            "mmap of {len} bytes: {}",
            std::io::Error::last_os_error()
        )));
    }
    let base = base as usize;
    let aligned = base.next_multiple_of(HUGE_PAGE);
    let head = aligned - base;
    let tail = len - head - size;
    // SAFETY: both pieces lie inside the mapping just made, outside [aligned, aligned + size),
    // and nothing refers to them (mmap returns page-aligned memory, and 2 MiB and the sizes
    // are page multiples).
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
    }
    if let Some(file) = file {
        // SAFETY: MAP_FIXED over [aligned, aligned + size), which is the anonymous mapping
        // made above and still ours alone (nothing refers to it yet); the file is open and
        // at least `size` long.
        let at = unsafe {
            libc::mmap(
                aligned as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                file.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // SAFETY: the anonymous mapping made above; nothing refers to it.
            unsafe { libc::munmap(aligned as *mut libc::c_void, size) };
            return Err(Error::MemoryAlloc(format!(
                "mmap of {size} bytes of the backing file: {e}"
            )));
        }
    }
    Ok(aligned)
}

/// Opens an unlinked file of `size` bytes in `dir` for guest RAM (`O_TMPFILE`, or a named
/// file removed at once where the file system has no `O_TMPFILE`) and says what backs it.
fn backing_file(dir: &Path, size: usize) -> Result<(File, Thp), Error> {
    let cannot = |e: std::io::Error| {
        Error::MemoryAlloc(format!(
            "can't open backing store {} for guest RAM: {e}",
            dir.display()
        ))
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
    {
        Ok(f) => f,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
            ) =>
        {
            let path = (0u32..)
                .map(|n| dir.join(format!("vmm_back_mem.{}.{n}", std::process::id())))
                .find(|p| !p.exists())
                .unwrap_or_else(|| dir.join("vmm_back_mem"));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(cannot)?;
            std::fs::remove_file(&path).map_err(cannot)?;
            f
        }
        Err(e) => return Err(cannot(e)),
    };
    // SAFETY: an all-zero statfs is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs into `st`, which lives across the call.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(cannot(std::io::Error::last_os_error()));
    }
    let block = st.f_bsize as u64;
    let thp = if st.f_type as i64 == HUGETLBFS_MAGIC {
        Thp::HugeTlbFs { page_size: block }
    } else {
        Thp::File { block_size: block }
    };
    let page = match thp {
        Thp::HugeTlbFs { page_size } => page_size,
        _ => 4096,
    };
    if page == 0 || !(size as u64).is_multiple_of(page) {
        return Err(Error::MemoryAlloc(format!(
            "guest RAM range of {size:#x} bytes is not a multiple of the page size {page:#x} of {}",
            dir.display()
        )));
    }
    file.set_len(size as u64).map_err(|e| {
        Error::MemoryAlloc(format!(
            "cannot size the backing file in {} to {size:#x} bytes: {e}",
            dir.display()
        ))
    })?;
    Ok((file, thp))
}

/// Allocates every page of `[host, host + size)` now (`MADV_POPULATE_WRITE`; on a kernel
/// without it, one write per 4 KiB page).
fn prealloc(host: usize, size: usize) -> Result<(), Error> {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    // SAFETY: advice on our own new mapping: it allocates its pages, contents stay zero.
    if unsafe { libc::madvise(host as *mut libc::c_void, size, MADV_POPULATE_WRITE) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(Error::MemoryAlloc(format!(
            "unable to preallocate {size:#x} bytes of guest RAM: {e}"
        )));
    }
    for page in (host..host + size).step_by(4096) {
        // SAFETY: `page` lies in our own new mapping, readable and writable, which nothing
        // else uses yet; writing back the value read (zero) changes nothing but allocates.
        unsafe {
            let p = page as *mut u8;
            p.write_volatile(p.read_volatile());
        }
    }
    Ok(())
}

/// Guest RAM for `ranges` (guest address, size; sorted, page multiples), backed as `backing`
/// says: each range on its own 2 MiB-aligned mapping, anonymous memory advised for
/// transparent huge pages unless a `mem_path` names a directory for it. Also unmaps the RAM of
/// earlier VMs nobody holds any more.
pub fn guest_ram(
    ranges: &[(u64, u64)],
    backing: &RamBacking,
) -> Result<(GuestMemoryMmap, Vec<RamRange>), Error> {
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    pool.sweep();
    let mode = thp_mode();
    let mut regions = Vec::new();
    let mut report = Vec::new();
    for &(guest, size) in ranges {
        let size = usize::try_from(size).map_err(|e| Error::MemoryAlloc(e.to_string()))?;
        let file = match &backing.mem_path {
            Some(dir) => Some(backing_file(dir, size)?),
            None => None,
        };
        let host = map_aligned(size, file.as_ref().map(|f| &f.0)).map_err(|e| match &file {
            Some((_, Thp::HugeTlbFs { page_size })) => Error::MemoryAlloc(format!(
                "{} ({} huge pages of {} KiB needed: see HugePages_Free in /proc/meminfo)",
                e.to_string()
                    .trim_start_matches("cannot allocate guest memory: "),
                size as u64 / page_size,
                page_size >> 10
            )),
            _ => e,
        })?;
        let flags = if file.is_some() {
            libc::MAP_PRIVATE
        } else {
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE
        };
        // SAFETY: [host, host + size) is the mapping made above; the pool keeps it mapped for
        // as long as the region (any clone of it) exists, see `Pool::sweep`.
        let region = unsafe {
            MmapRegion::build_raw(
                host as *mut u8,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
            )
        };
        let region = match region {
            Ok(r) => Arc::new(r),
            Err(e) => {
                // SAFETY: the mapping made above; nothing refers to it.
                unsafe { libc::munmap(host as *mut libc::c_void, size) };
                return Err(Error::MemoryAlloc(e.to_string()));
            }
        };
        pool.0.push(Mapping {
            region: region.clone(),
            addr: host,
            len: size,
        });
        let thp = match file {
            Some((_, t @ Thp::HugeTlbFs { .. })) => t,
            Some((_, t)) => {
                // Advised too (shmem honours it per its own THP setting); a refusal is fine.
                // SAFETY: advice on our own mapping; it changes no memory contents.
                unsafe { libc::madvise(host as *mut libc::c_void, size, libc::MADV_HUGEPAGE) };
                t
            }
            None => {
                // SAFETY: advice on our own mapping; it changes no memory contents.
                let rc =
                    unsafe { libc::madvise(host as *mut libc::c_void, size, libc::MADV_HUGEPAGE) };
                if rc == 0 {
                    Thp::Advised { mode: mode.clone() }
                } else {
                    Thp::Unavailable(format!(
                        "madvise(MADV_HUGEPAGE): {}",
                        std::io::Error::last_os_error()
                    ))
                }
            }
        };
        if backing.prealloc {
            prealloc(host, size)?;
        }
        let r = GuestRegionMmap::with_arc(region, GuestAddress(guest)).ok_or_else(|| {
            Error::MemoryAlloc(format!("guest range {guest:#x}+{size:#x} overflows"))
        })?;
        regions.push(Arc::new(r));
        report.push(RamRange {
            guest,
            host,
            size,
            thp,
        });
    }
    let mem = GuestMemoryMmap::from_arc_regions(regions)
        .map_err(|e| Error::MemoryAlloc(e.to_string()))?;
    Ok((mem, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn ram_is_2mib_aligned_advised_and_freed_with_its_last_user() {
        let ranges = crate::layout::ram_ranges(20 << 20);
        let (mem, report) = guest_ram(&ranges, &RamBacking::default()).unwrap();
        assert_eq!(report.len(), 1);
        let r = &report[0];
        assert_eq!(r.host % HUGE_PAGE, 0, "host address {:#x}", r.host);
        assert_eq!(r.size, 20 << 20);
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        assert_eq!(host, r.host);
        match &r.thp {
            Thp::Advised { mode } => {
                // The host says which mode it runs; ours is advised in any mode but never.
                assert!(
                    ["always", "madvise", "never"].contains(&mode.as_str()),
                    "{mode:?}"
                );
                let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
                let start = format!("{:x}-", r.host);
                let flags = smaps
                    .lines()
                    .skip_while(|l| !l.starts_with(&start))
                    .find(|l| l.starts_with("VmFlags"))
                    .unwrap();
                assert!(flags.contains(" hg"), "MADV_HUGEPAGE not set: {flags}");
            }
            Thp::Unavailable(why) => {
                assert!(why.starts_with("madvise(MADV_HUGEPAGE): "), "{why}");
                assert!(
                    !std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists(),
                    "THP is there but madvise failed: {why}"
                );
            }
            other => panic!("anonymous RAM reported as {other:?}"),
        }
        // It is memory: written and read back through vm-memory, zero elsewhere.
        mem.write_obj(0x1234_5678u32, GuestAddress(19 << 20))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(19 << 20)).unwrap(),
            0x1234_5678
        );
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0)).unwrap(), 0);
        // A clone keeps it mapped through a sweep; the last user gone, the next sweep unmaps
        // it (the pool drops its region right when it unmaps it).
        let region = std::sync::Arc::downgrade(&mem.iter().next().unwrap().get_mmap());
        let clone = mem.clone();
        drop(mem);
        let (other, _) = guest_ram(&[(0, 2 << 20)], &RamBacking::default()).unwrap();
        assert!(
            region.upgrade().is_some(),
            "unmapped while a clone holds it"
        );
        assert_eq!(
            clone.read_obj::<u32>(GuestAddress(19 << 20)).unwrap(),
            0x1234_5678
        );
        drop(clone);
        let (again, _) = guest_ram(&[(0, 2 << 20)], &RamBacking::default()).unwrap();
        assert!(
            region.upgrade().is_none(),
            "RAM of a dropped VM still mapped"
        );
        drop((other, again));
    }

    #[test]
    fn ranges_above_4g_keep_their_place() {
        let (mem, report) =
            guest_ram(&[(0, 4 << 20), (1 << 32, 6 << 20)], &RamBacking::default()).unwrap();
        assert_eq!(report.len(), 2);
        for r in &report {
            assert_eq!(r.host % HUGE_PAGE, 0);
        }
        assert_eq!(report[1].guest, 1 << 32);
        assert!(mem
            .write_obj(1u8, GuestAddress((1 << 32) + (6 << 20) - 1))
            .is_ok());
        assert!(mem.write_obj(1u8, GuestAddress(4 << 20)).is_err());
    }

    /// The smaps entry of the mapping that starts at `host`: its header line and `Rss` in KiB.
    fn smaps_of(host: usize) -> (String, u64) {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{host:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        let header = lines.next().expect("mapping in smaps").to_string();
        let rss = lines
            .find_map(|l| l.strip_prefix("Rss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        (header, rss)
    }

    #[test]
    fn prealloc_allocates_every_page_before_the_guest_runs() {
        let backing = RamBacking {
            mem_path: None,
            prealloc: true,
        };
        let (mem, report) = guest_ram(&[(0, 6 << 20)], &backing).unwrap();
        let (_, rss) = smaps_of(report[0].host);
        assert_eq!(rss, 6 << 10, "resident KiB of 6 MiB preallocated");
        let (lazy, report) = guest_ram(&[(0, 6 << 20)], &RamBacking::default()).unwrap();
        let (_, rss) = smaps_of(report[0].host);
        assert!(rss < 6 << 10, "not preallocated, yet {rss} KiB resident");
        drop((mem, lazy));
    }

    #[test]
    fn mem_path_backs_ram_with_an_unlinked_file() {
        let dir = std::path::PathBuf::from(format!("/dev/shm/vmm-mem-path-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let backing = RamBacking {
            mem_path: Some(dir.clone()),
            prealloc: true,
        };
        let (mem, report) = guest_ram(&[(0, 4 << 20), (1 << 32, 2 << 20)], &backing).unwrap();
        assert_eq!(report.len(), 2);
        for r in &report {
            assert_eq!(r.host % HUGE_PAGE, 0);
            assert!(matches!(r.thp, Thp::File { .. }), "{:?}", r.thp);
            let (header, rss) = smaps_of(r.host);
            assert!(
                header.contains("/dev/shm/") && header.ends_with("(deleted)"),
                "{header}"
            );
            assert_eq!(rss << 10, r.size as u64, "{header}");
        }
        // Nothing left in the directory; it is memory like any other.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        mem.write_obj(0xfeed_u32, GuestAddress((1 << 32) + 8))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress((1 << 32) + 8)).unwrap(),
            0xfeed
        );
        assert_eq!(mem.read_obj::<u64>(GuestAddress(4096)).unwrap(), 0);
        drop(mem);
        std::fs::remove_dir(&dir).unwrap();
        // A directory that is not there: QEMU's words, and nothing mapped.
        let err = guest_ram(&[(0, 2 << 20)], &backing)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "cannot allocate guest memory: can't open backing store {} for guest RAM: No such file or directory (os error 2)",
                dir.display()
            )
        );
    }
}
