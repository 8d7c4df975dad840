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

use std::sync::{Arc, Mutex};

use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::Error;

/// Huge pages are 2 MiB on x86-64.
pub const HUGE_PAGE: usize = 2 << 20;

/// What transparent huge pages do for one RAM range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Thp {
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

/// Maps `size` bytes of anonymous memory at a 2 MiB-aligned address; returns the address.
fn map_aligned(size: usize) -> Result<usize, Error> {
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
    Ok(aligned)
}

/// Guest RAM for `ranges` (guest address, size; sorted, page multiples): each range on its own
/// 2 MiB-aligned anonymous mapping advised for transparent huge pages. Also unmaps the RAM of
/// earlier VMs nobody holds any more.
pub fn guest_ram(ranges: &[(u64, u64)]) -> Result<(GuestMemoryMmap, Vec<RamRange>), Error> {
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    pool.sweep();
    let mode = thp_mode();
    let mut regions = Vec::new();
    let mut report = Vec::new();
    for &(guest, size) in ranges {
        let size = usize::try_from(size).map_err(|e| Error::MemoryAlloc(e.to_string()))?;
        let host = map_aligned(size)?;
        // SAFETY: [host, host + size) is the anonymous mapping made above; the pool keeps it
        // mapped for as long as the region (any clone of it) exists, see `Pool::sweep`.
        let region = unsafe {
            MmapRegion::build_raw(
                host as *mut u8,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
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
        // SAFETY: advice on our own mapping; it changes no memory contents.
        let rc = unsafe { libc::madvise(host as *mut libc::c_void, size, libc::MADV_HUGEPAGE) };
        let thp = if rc == 0 {
            Thp::Advised { mode: mode.clone() }
        } else {
            Thp::Unavailable(format!(
                "madvise(MADV_HUGEPAGE): {}",
                std::io::Error::last_os_error()
            ))
        };
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
        let (mem, report) = guest_ram(&ranges).unwrap();
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
        let (other, _) = guest_ram(&[(0, 2 << 20)]).unwrap();
        assert!(
            region.upgrade().is_some(),
            "unmapped while a clone holds it"
        );
        assert_eq!(
            clone.read_obj::<u32>(GuestAddress(19 << 20)).unwrap(),
            0x1234_5678
        );
        drop(clone);
        let (again, _) = guest_ram(&[(0, 2 << 20)]).unwrap();
        assert!(
            region.upgrade().is_none(),
            "RAM of a dropped VM still mapped"
        );
        drop((other, again));
    }

    #[test]
    fn ranges_above_4g_keep_their_place() {
        let (mem, report) = guest_ram(&[(0, 4 << 20), (1 << 32, 6 << 20)]).unwrap();
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
}
