//! SIGINT and SIGTERM end the VM cleanly: blocked in every thread, waited for by one.

use std::sync::Arc;

use crate::stop::{Stop, StopReason};
use crate::Error;

/// Blocks SIGINT and SIGTERM in the calling thread, and so in every thread it creates later:
/// they stay pending until [`handle_stop_signals`] waits for them.
pub fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; the libc calls only read and write the local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Turns SIGINT and SIGTERM (blocked by [`block_stop_signals`]) into a clean stop, on a
/// `signals` thread confined by `filter` (see [`crate::seccomp::signals_filter_with`]) before
/// it waits.
pub fn handle_stop_signals(
    set: libc::sigset_t,
    stop: &Arc<Stop>,
    filter: Option<crate::seccomp::Filter>,
) -> Result<(), Error> {
    let stop = stop.clone();
    crate::seccomp::spawn_confined("signals", filter, move || loop {
        let mut sig = 0;
        // SAFETY: `set` is a valid, initialised signal set and `sig` a valid out pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            stop.stop(StopReason::Signal(sig));
        }
    })?;
    Ok(())
}
