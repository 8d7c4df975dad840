//! The device-work executor: where a virtio device's lifecycle work runs (activation at
//! `DRIVER_OK`, reset), never on a vCPU thread.
//!
//! A guest status write only decodes and posts: the transport records what the driver asked
//! for and hands the executor a [`DeviceJob`] (an `Arc` clone and an eventfd write; the queue
//! holds each device at most once, so a guest toggling its status cannot grow it). One thread
//! per machine runs the jobs in the order they were posted; worker threads are started, file
//! descriptors duplicated and workers joined there. The VMM creates one [`DeviceWork`] per
//! machine and hands it to the transports through [`super::pci::VirtioHost::device_work`].
//!
//! [`DeviceWork::inline`] runs each job on the posting thread instead: for hosts without vCPUs
//! (unit tests, the fuzzer), where determinism matters more than the thread a job runs on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{JoinHandle, ThreadId};

use vmm_sys_util::eventfd::EventFd;

/// Work for the executor: what a device's driver asked for (activate, reset).
pub trait DeviceJob: Send + Sync {
    /// Carries the work out, on the executor's thread.
    fn run(&self);
}

/// What the executor thread runs first (the VMM installs its seccomp filter here).
type ThreadInit = Box<dyn Fn() -> Result<(), String> + Send + Sync>;
static THREAD_INIT: std::sync::OnceLock<ThreadInit> = std::sync::OnceLock::new();

/// Sets the function the executor thread of every [`DeviceWork::start`] runs before anything
/// else (once per process; later calls are ignored). If it fails, `start` fails.
pub fn set_executor_init(f: impl Fn() -> Result<(), String> + Send + Sync + 'static) {
    let _ = THREAD_INIT.set(Box::new(f));
}

struct Queue {
    jobs: Mutex<VecDeque<Arc<dyn DeviceJob>>>,
    wake: EventFd,
    stop: AtomicBool,
}

struct Thread {
    queue: Arc<Queue>,
    id: ThreadId,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Thread {
    fn drop(&mut self) {
        // The last handle: the thread finishes what was posted, then ends.
        self.queue.stop.store(true, Ordering::Release);
        let _ = self.queue.wake.write(1);
        let handle = self.handle.lock().unwrap_or_else(|p| p.into_inner()).take();
        // Never join from the executor itself (a job may drop the last handle).
        if let Some(h) = handle.filter(|_| std::thread::current().id() != self.id) {
            let _ = h.join();
        }
    }
}

enum Mode {
    Inline,
    Thread(Arc<Thread>),
}

/// A handle on a device-work executor (cheap to clone; the thread ends when the last handle
/// goes, after finishing the jobs posted).
#[derive(Clone)]
pub struct DeviceWork {
    mode: Arc<Mode>,
}

impl std::fmt::Debug for DeviceWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.mode {
            Mode::Inline => f.write_str("DeviceWork(inline)"),
            Mode::Thread(t) => write!(f, "DeviceWork({:?})", t.id),
        }
    }
}

impl DeviceWork {
    /// Starts the executor thread (`device-work`), which runs the function set by
    /// [`set_executor_init`] first; Err if that fails or the thread cannot be created.
    pub fn start() -> std::io::Result<DeviceWork> {
        Self::start_with(|| THREAD_INIT.get().map_or(Ok(()), |init| init()))
    }

    /// [`DeviceWork::start`] with `init` run first on the thread instead of the function set
    /// by [`set_executor_init`].
    pub fn start_with(
        init: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> std::io::Result<DeviceWork> {
        let queue = Arc::new(Queue {
            jobs: Mutex::new(VecDeque::new()),
            wake: EventFd::new(0)?,
            stop: AtomicBool::new(false),
        });
        let q = queue.clone();
        let (ready, set_up) = std::sync::mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name("device-work".into())
            .spawn(move || {
                let init = init();
                let ok = init.is_ok();
                let _ = ready.send(init);
                if ok {
                    run(&q);
                }
            })?;
        match set_up.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = handle.join();
                return Err(std::io::Error::other(format!(
                    "device-work thread set-up: {e}"
                )));
            }
            Err(_) => return Err(std::io::Error::other("device-work thread ended")),
        }
        let id = handle.thread().id();
        Ok(DeviceWork {
            mode: Arc::new(Mode::Thread(Arc::new(Thread {
                queue,
                id,
                handle: Mutex::new(Some(handle)),
            }))),
        })
    }

    /// An executor that runs each job on the thread that posts it, at once (tests, fuzzing:
    /// never for a VM's vCPUs).
    pub fn inline() -> DeviceWork {
        DeviceWork {
            mode: Arc::new(Mode::Inline),
        }
    }

    /// Queues `job` and wakes the executor; returns at once (inline: runs it first). Takes the
    /// queue's lock only to push (the executor holds it only to pop), writes one eventfd.
    pub fn post(&self, job: Arc<dyn DeviceJob>) {
        match &*self.mode {
            Mode::Inline => job.run(),
            Mode::Thread(t) => {
                t.queue
                    .jobs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_back(job);
                let _ = t.queue.wake.write(1);
            }
        }
    }

    /// Whether the calling thread is this executor's thread.
    pub fn on_executor(&self) -> bool {
        match &*self.mode {
            Mode::Inline => false,
            Mode::Thread(t) => std::thread::current().id() == t.id,
        }
    }

    /// Waits until every job posted before the call has run (tests; the VMM before it looks
    /// at device state). Returns at once on the executor's own thread and when inline.
    pub fn flush(&self) {
        if matches!(&*self.mode, Mode::Inline) || self.on_executor() {
            return;
        }
        let done = Arc::new(Flush::default());
        self.post(done.clone());
        let mut d = done.done.lock().unwrap_or_else(|p| p.into_inner());
        while !*d {
            d = done.cond.wait(d).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[derive(Default)]
struct Flush {
    done: Mutex<bool>,
    cond: Condvar,
}

impl DeviceJob for Flush {
    fn run(&self) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cond.notify_all();
    }
}

fn run(q: &Queue) {
    loop {
        let next = q.jobs.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
        match next {
            Some(job) => job.run(),
            None if q.stop.load(Ordering::Acquire) => return,
            None => {
                // Blocks until a post (or the stop) writes the eventfd.
                if let Err(e) = q.wake.read() {
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        tracing::error!("device-work: eventfd read failed, stopping: {e}");
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Record {
        order: Mutex<Vec<(usize, Option<ThreadId>)>>,
        n: AtomicUsize,
    }

    struct Job(Arc<Record>, usize);

    impl DeviceJob for Job {
        fn run(&self) {
            self.0.n.fetch_add(1, Ordering::SeqCst);
            self.0
                .order
                .lock()
                .unwrap()
                .push((self.1, Some(std::thread::current().id())));
        }
    }

    #[test]
    fn jobs_run_in_order_on_the_executor_thread_and_flush_waits_for_them() {
        let work = DeviceWork::start().unwrap();
        let rec = Arc::new(Record {
            order: Mutex::new(Vec::new()),
            n: AtomicUsize::new(0),
        });
        for i in 0..100 {
            work.post(Arc::new(Job(rec.clone(), i)));
        }
        work.flush();
        assert_eq!(rec.n.load(Ordering::SeqCst), 100);
        let order = rec.order.lock().unwrap();
        let me = std::thread::current().id();
        for (i, (n, t)) in order.iter().enumerate() {
            assert_eq!(*n, i, "in order");
            assert_ne!(*t, Some(me), "not on the posting thread");
        }
        assert!(!work.on_executor());
    }

    #[test]
    fn the_last_handle_finishes_the_posted_jobs_and_ends_the_thread() {
        let rec = Arc::new(Record {
            order: Mutex::new(Vec::new()),
            n: AtomicUsize::new(0),
        });
        let work = DeviceWork::start().unwrap();
        let other = work.clone();
        for i in 0..10 {
            work.post(Arc::new(Job(rec.clone(), i)));
        }
        drop(work);
        other.post(Arc::new(Job(rec.clone(), 10)));
        drop(other); // joins
        assert_eq!(rec.n.load(Ordering::SeqCst), 11);
    }

    #[test]
    fn inline_runs_on_the_caller() {
        let rec = Arc::new(Record {
            order: Mutex::new(Vec::new()),
            n: AtomicUsize::new(0),
        });
        DeviceWork::inline().post(Arc::new(Job(rec.clone(), 0)));
        assert_eq!(
            rec.order.lock().unwrap()[0].1,
            Some(std::thread::current().id())
        );
    }
}
