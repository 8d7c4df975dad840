//! Several vCPUs at once: threads run random BAR/MMIO/config operations on one machine (the
//! lock-free bus, BAR remapping, virtio bring-ups and resets racing each other) for a bounded
//! time. Nothing may panic or deadlock, and the machine's invariants hold afterwards.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuzz::targets::pci::{bar_mmio_op, PciMachine};
use fuzz::{Input, XorShift};

#[test]
fn concurrent_vcpus_cannot_break_the_pci_machine() {
    fuzz::install_panic_counter();
    let seed = fuzz::seed_from_env();
    eprintln!("concurrency seed {seed:#x}");
    let m = Arc::new(PciMachine::new());
    m.firmware_setup();
    let (tx, rx) = mpsc::channel();
    let threads = 3;
    for t in 0..threads {
        let m = m.clone();
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut rng = XorShift::new(seed ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9));
            let start = Instant::now();
            let mut ops = 0u64;
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                while start.elapsed() < Duration::from_millis(1500) {
                    let bytes: Vec<u8> = (0..64).map(|_| rng.next_u64() as u8).collect();
                    let mut inp = Input::new(&bytes);
                    bar_mmio_op(&m, &mut inp, false);
                    ops += 1;
                }
            }));
            let _ = tx.send((t, r.is_ok(), ops));
        });
    }
    drop(tx);
    for _ in 0..threads {
        let (t, ok, ops) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a vCPU thread did not finish: deadlock?");
        assert!(ok, "thread {t} panicked (seed {seed:#x})");
        eprintln!("thread {t}: {ops} operations");
    }
    m.check();
    m.quiesce();
}
