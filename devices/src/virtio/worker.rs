//! A device's worker thread: waits on its queues' notification eventfds (and on any extra file
//! descriptors of the device's backend, such as a tap) and runs the device's handler for each
//! queue that was notified or fd that became ready. Stopped (and joined) on reset or drop.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::ActivateError;
use super::ActiveQueue;

/// What every worker thread runs first (the VMM installs its seccomp filter here).
type ThreadInit = Box<dyn Fn() -> Result<(), String> + Send + Sync>;
static THREAD_INIT: std::sync::OnceLock<ThreadInit> = std::sync::OnceLock::new();

/// Sets the function every device worker thread runs before anything else (once per process;
/// later calls are ignored). If it fails, the worker does not start serving its queues.
pub fn set_thread_init(f: impl Fn() -> Result<(), String> + Send + Sync + 'static) {
    let _ = THREAD_INIT.set(Box::new(f));
}

/// Runs the function set by [`set_thread_init`] (nothing if none was set) on the calling
/// thread: for other threads that serve devices the way workers do (e.g. the VMM's INTx
/// resampler) and must run under the same restrictions.
pub fn run_thread_init() -> Result<(), String> {
    THREAD_INIT.get().map_or(Ok(()), |init| init())
}

/// What a device does when a queue is notified. Runs on the worker thread only.
pub trait QueueHandler: Send + 'static {
    /// Processes what the driver made available on `queue`.
    fn process(&mut self, queue: &mut ActiveQueue);
    /// Extra fd number `index` (its position in [`QueueWorker::start_with_fds`]'s list) is
    /// ready; `queues` are all the device's active queues.
    fn fd_ready(&mut self, _index: usize, _queues: &mut [ActiveQueue]) {}
}

/// Serves every chain available on `q`: `f` handles one chain and returns the number of bytes
/// it wrote into the chain's device-writable buffers (the used length). Notifications are
/// suppressed while the queue is drained. Ok(true): the driver should be interrupted.
/// Err: the queue itself is unusable (bad ring, bad index): the device needs a reset.
pub fn serve_queue<F>(
    q: &mut ActiveQueue,
    mem: &GuestMemoryMmap,
    mut f: F,
) -> Result<bool, virtio_queue::Error>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    let mut used_any = false;
    loop {
        q.queue.disable_notification(mem)?;
        let mut progress = false;
        loop {
            let next = q.queue.iter(mem)?.next();
            let Some(chain) = next else { break };
            let head = chain.head_index();
            let len = f(chain);
            q.queue.add_used(mem, head, len)?;
            used_any = true;
            progress = true;
        }
        if !q.queue.enable_notification(mem)? {
            break;
        }
        if !progress {
            // More is announced but nothing can be popped (an unreadable avail ring entry).
            return Err(virtio_queue::Error::InvalidAvailRingIndex);
        }
    }
    Ok(used_any && q.queue.needs_notification(mem)?)
}

/// A running worker thread, or none.
#[derive(Default)]
pub struct QueueWorker {
    running: Mutex<Option<(EventFd, JoinHandle<()>)>>,
}

impl QueueWorker {
    /// Starts a worker over `queues`, replacing (and stopping) any previous one.
    pub fn start<H: QueueHandler>(
        &self,
        name: &str,
        queues: Vec<ActiveQueue>,
        handler: H,
    ) -> Result<(), ActivateError> {
        self.start_with_fds(name, queues, &[], handler)
    }

    /// [`QueueWorker::start`], also waiting on `fds` (each with the epoll events wanted, e.g.
    /// `EventSet::IN | EventSet::EDGE_TRIGGERED`): when one is ready the handler's
    /// [`QueueHandler::fd_ready`] runs with its index in `fds`. The fds must stay open while
    /// the worker runs (the handler usually owns them).
    pub fn start_with_fds<H: QueueHandler>(
        &self,
        name: &str,
        mut queues: Vec<ActiveQueue>,
        fds: &[(RawFd, EventSet)],
        mut handler: H,
    ) -> Result<(), ActivateError> {
        self.stop();
        let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::host("worker eventfd"))?;
        let epoll = Epoll::new().map_err(ActivateError::host("worker epoll"))?;
        let kill_token = queues.len() as u64;
        epoll
            .ctl(
                ControlOperation::Add,
                kill.as_raw_fd(),
                EpollEvent::new(EventSet::IN, kill_token),
            )
            .map_err(ActivateError::host("worker epoll"))?;
        for (i, q) in queues.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    q.event.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, i as u64),
                )
                .map_err(ActivateError::host("queue eventfd in the worker's epoll"))?;
        }
        let first_fd = kill_token + 1;
        for (i, &(fd, events)) in fds.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(events, first_fd + i as u64),
                )
                .map_err(ActivateError::host("backend fd in the worker's epoll"))?;
        }
        let thread_kill = kill
            .try_clone()
            .map_err(ActivateError::host("worker eventfd"))?;
        let fds_len = fds.len();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                if let Err(e) = run_thread_init() {
                    tracing::error!("device worker: thread set-up failed: {e}");
                    return;
                }
                let _keep = thread_kill;
                let mut events = vec![EpollEvent::default(); queues.len() + 1 + fds_len];
                // Buffers may already be waiting (a driver that notified before DRIVER_OK).
                for q in queues.iter_mut() {
                    handler.process(q);
                }
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            // The device stops serving its queues: say so, loudly.
                            tracing::error!("device worker: epoll_wait failed, stopping: {e}");
                            return;
                        }
                    };
                    for ev in &events[..n] {
                        let token = ev.data();
                        if token == kill_token {
                            return;
                        }
                        if let Some(q) = queues.get_mut(token as usize) {
                            let _ = q.event.read();
                            handler.process(q);
                        } else if token >= first_fd {
                            handler.fd_ready((token - first_fd) as usize, &mut queues);
                        }
                    }
                }
            })
            .map_err(ActivateError::Thread)?;
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some((kill, handle));
        Ok(())
    }

    /// Stops the worker, if one runs, and waits for it.
    pub fn stop(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((kill, handle)) = running {
            let _ = kill.write(1);
            let _ = handle.join();
        }
    }

    /// Whether a worker runs.
    pub fn is_running(&self) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::time::Duration;
    use virtio_queue::Queue;

    struct Recorder {
        tx: Sender<(&'static str, usize)>,
        extra: EventFd,
    }

    impl QueueHandler for Recorder {
        fn process(&mut self, q: &mut ActiveQueue) {
            let _ = self.tx.send(("queue", usize::from(q.index)));
        }
        fn fd_ready(&mut self, index: usize, queues: &mut [ActiveQueue]) {
            let _ = self.extra.read();
            let _ = self.tx.send(("fd", index + 10 * queues.len()));
        }
    }

    fn next(rx: &Receiver<(&'static str, usize)>) -> (&'static str, usize) {
        rx.recv_timeout(Duration::from_secs(5))
            .expect("worker event")
    }

    #[test]
    fn extra_fds_reach_the_handler_and_stop_joins() {
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        let notify = event.try_clone().unwrap();
        let extra = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = channel();
        let handler = Recorder {
            tx,
            extra: extra.try_clone().unwrap(),
        };
        let q = ActiveQueue {
            index: 3,
            queue: Queue::new(16).unwrap(),
            event,
        };
        let w = QueueWorker::default();
        w.start_with_fds(
            "test-worker",
            vec![q],
            &[(extra.as_raw_fd(), EventSet::IN)],
            handler,
        )
        .unwrap();
        assert!(w.is_running());
        assert_eq!(next(&rx), ("queue", 3), "initial pass");
        notify.write(1).unwrap();
        assert_eq!(next(&rx), ("queue", 3));
        extra.write(1).unwrap();
        assert_eq!(next(&rx), ("fd", 10), "fd 0 with the one queue");
        w.stop();
        assert!(!w.is_running());
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
    }
}
