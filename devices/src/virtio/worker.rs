//! A device's worker thread: waits on its queues' notification eventfds and runs the device's
//! handler for each queue that was notified. Stopped (and joined) on reset or drop.

use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::ActiveQueue;

/// What a device does when a queue is notified. Runs on the worker thread only.
pub trait QueueHandler: Send + 'static {
    /// Processes what the driver made available on `queue`.
    fn process(&mut self, queue: &mut ActiveQueue);
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
        mut queues: Vec<ActiveQueue>,
        mut handler: H,
    ) -> Result<(), String> {
        self.stop();
        let kill = EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let epoll = Epoll::new().map_err(|e| e.to_string())?;
        let kill_token = queues.len() as u64;
        epoll
            .ctl(
                ControlOperation::Add,
                kill.as_raw_fd(),
                EpollEvent::new(EventSet::IN, kill_token),
            )
            .map_err(|e| e.to_string())?;
        for (i, q) in queues.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    q.event.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, i as u64),
                )
                .map_err(|e| e.to_string())?;
        }
        let thread_kill = kill.try_clone().map_err(|e| e.to_string())?;
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _keep = thread_kill;
                let mut events = vec![EpollEvent::default(); queues.len() + 1];
                // Buffers may already be waiting (a driver that notified before DRIVER_OK).
                for q in queues.iter_mut() {
                    handler.process(q);
                }
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    };
                    for ev in &events[..n] {
                        let token = ev.data();
                        if token == kill_token {
                            return;
                        }
                        if let Some(q) = queues.get_mut(token as usize) {
                            let _ = q.event.read();
                            handler.process(q);
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?;
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
