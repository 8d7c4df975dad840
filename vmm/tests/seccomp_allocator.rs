//! A thread under the real (KillProcess) device-worker filter allocates and frees enough to
//! make glibc shrink a heap, as the virtio workers do. Without
//! `vmm::seccomp::prepare_allocator` at the start of the process, glibc gives the thread its own
//! arena and trimming it reads /proc/sys/vm/overcommit_memory: `openat`, refused, and the whole
//! process dies by SIGSYS (what happened to the vmm with five virtio devices and a QMP socket).
//!
//! No test harness (`harness = false`): this must be a fresh process where `main` runs before
//! any other thread exists, as in the vmm. A crash fails the test; success prints a line.

fn churn() -> usize {
    // 64 blocks of 100 KB (below glibc's mmap threshold, so they come from the arena's heap),
    // then all freed: the top of the heap is free and large, which makes glibc trim it.
    let blocks: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 100_000]).collect();
    let total = blocks.iter().map(|b| b.len()).sum();
    drop(blocks);
    total
}

fn main() {
    vmm::seccomp::prepare_allocator();
    let filter = vmm::seccomp::device_filter().expect("device filter");
    let worker = std::thread::spawn(move || {
        vmm::seccomp::apply(&filter).expect("apply the filter");
        (0..8).map(|_| churn()).sum::<usize>()
    });
    let total = worker.join().expect("the filtered thread");
    assert_eq!(total, 8 * 64 * 100_000);
    println!("seccomp_allocator: a filtered thread allocated and freed {total} bytes: ok");
}
