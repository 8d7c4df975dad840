//! The QMP server: the unix socket, one client at a time, framing, events.
//!
//! Threads: one accepts and serves clients one after another (a second client waits in the
//! listen backlog, as with a QEMU socket chardev, and is greeted when the first leaves); one
//! writes queued events to the negotiated client. Events are queued by [`EventSink::emit`],
//! which only takes a short lock: it never waits for a client. The queue is bounded
//! ([`EVENT_QUEUE_CAPACITY`]): when full the oldest event is dropped. Writes to a client time
//! out after [`WRITE_TIMEOUT`]; a client that does not read is disconnected.
//!
//! Framing follows QEMU's JSON streamer: a message ends where its outermost `{}`/`[]` closes
//! (a top-level scalar ends at whitespace), so clients may or may not send newlines. Replies
//! and events are one JSON object per line. A message larger than [`MAX_MESSAGE_SIZE`] gets
//! an error and the connection is closed.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::commands::{self, greeting, Outcome};
use super::control::{CommandError, VmControl};

/// Largest accepted message, in bytes. A larger one is answered with an error and the
/// connection is closed.
pub const MAX_MESSAGE_SIZE: usize = 1 << 20;
/// Events kept for a slow client before the oldest are dropped.
pub const EVENT_QUEUE_CAPACITY: usize = 1024;
/// How long a write to a client may block before the client is disconnected.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One client connection.
struct Conn {
    /// For shutdown().
    stream: UnixStream,
    /// Serializes writes (replies and events).
    writer: Mutex<UnixStream>,
    dead: AtomicBool,
}

impl Conn {
    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Writes the queued events (if this is the negotiated client), then `line`.
    fn flush(self: &Arc<Self>, shared: &Shared, line: Option<&str>) {
        let mut w = lock(&self.writer);
        let events: Vec<String> = {
            let mut st = lock(&shared.state);
            match &st.conn {
                Some(c) if Arc::ptr_eq(c, self) && st.negotiated => st.queue.drain(..).collect(),
                _ => Vec::new(),
            }
        };
        if self.is_dead() {
            return;
        }
        for l in events.iter().map(String::as_str).chain(line) {
            let mut bytes = Vec::with_capacity(l.len() + 1);
            bytes.extend_from_slice(l.as_bytes());
            bytes.push(b'\n');
            if w.write_all(&bytes).and_then(|_| w.flush()).is_err() {
                tracing::debug!("qmp: client write failed, disconnecting");
                self.kill();
                return;
            }
        }
    }
}

#[derive(Default)]
struct State {
    /// Events for the negotiated client.
    queue: VecDeque<String>,
    /// The connected client, if any.
    conn: Option<Arc<Conn>>,
    /// Whether it completed capabilities negotiation (events go only to such a client).
    negotiated: bool,
    shutdown: bool,
    dropped: u64,
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

/// Sends QMP events to the connected client. Cheap to clone; callable from any thread; never
/// blocks on the client. Events emitted while no client has negotiated are dropped (QEMU
/// does the same).
#[derive(Clone)]
pub struct EventSink {
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink")
            .field("connected", &self.shared.is_some())
            .finish()
    }
}

impl EventSink {
    /// A sink that drops everything (a machine without `--qmp`).
    pub fn disconnected() -> Self {
        EventSink { shared: None }
    }

    /// Emits `{"event": name, "data": data, "timestamp": {...}}`; `data` is left out when
    /// `Value::Null` (QEMU's events without data, e.g. `STOP`).
    pub fn emit(&self, name: &str, data: Value) {
        let Some(shared) = &self.shared else {
            return;
        };
        let line = event_line(name, data, SystemTime::now());
        let mut st = lock(&shared.state);
        if !st.negotiated || st.conn.is_none() || st.shutdown {
            return;
        }
        if st.queue.len() >= EVENT_QUEUE_CAPACITY {
            st.queue.pop_front();
            st.dropped += 1;
            if st.dropped.is_power_of_two() {
                tracing::warn!("qmp: client too slow, {} events dropped", st.dropped);
            }
        }
        st.queue.push_back(line);
        shared.cond.notify_all();
    }

    /// `STOP`: the vCPUs stopped.
    pub fn stop(&self) {
        self.emit("STOP", Value::Null);
    }

    /// `RESUME`: the vCPUs run.
    pub fn resume(&self) {
        self.emit("RESUME", Value::Null);
    }

    /// `SHUTDOWN`: `guest` says whether the guest asked; `reason` is QEMU's ShutdownCause
    /// (`host-qmp-quit`, `guest-shutdown`, `host-signal`, `guest-reset`, ...).
    pub fn shutdown(&self, guest: bool, reason: &str) {
        self.emit("SHUTDOWN", json!({"guest": guest, "reason": reason}));
    }

    /// `RESET`: `guest` and `reason` as for [`EventSink::shutdown`]
    /// (`host-qmp-system-reset`, `guest-reset`).
    pub fn reset(&self, guest: bool, reason: &str) {
        self.emit("RESET", json!({"guest": guest, "reason": reason}));
    }

    /// `DEVICE_DELETED`: `device` is the id (left out for id-less devices), `path` the QOM
    /// path (`/machine/peripheral/ID` or `/machine/peripheral-anon/device[N]`).
    pub fn device_deleted(&self, device: Option<&str>, path: &str) {
        let mut data = Map::new();
        if let Some(id) = device {
            data.insert("device".into(), Value::String(id.into()));
        }
        data.insert("path".into(), Value::String(path.into()));
        self.emit("DEVICE_DELETED", Value::Object(data));
    }
}

/// One event as a line of JSON.
pub fn event_line(name: &str, data: Value, at: SystemTime) -> String {
    let t = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut ev = Map::new();
    ev.insert("event".into(), Value::String(name.into()));
    if !data.is_null() {
        ev.insert("data".into(), data);
    }
    ev.insert(
        "timestamp".into(),
        json!({"seconds": t.as_secs(), "microseconds": t.subsec_micros()}),
    );
    Value::Object(ev).to_string()
}

/// The running server. [`QmpServer::shutdown`] (or drop) stops it.
pub struct QmpServer {
    shared: Arc<Shared>,
    path: PathBuf,
    accept: Option<JoinHandle<()>>,
    pump: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpServer")
            .field("path", &self.path)
            .finish()
    }
}

impl QmpServer {
    /// Binds `path` (removing a stale socket there first; mode 0600) and serves clients on
    /// its own threads. Fails if `path` exists and is not a socket, or cannot be bound.
    pub fn start(path: &Path, backend: Arc<dyn VmControl>) -> io::Result<(QmpServer, EventSink)> {
        Self::start_confined(path, backend, ThreadSetup::default())
    }

    /// [`QmpServer::start`], with `setup` run first on each of the server's threads (the vmm
    /// installs their seccomp filters there). Err if a set-up fails: no thread serves then.
    pub fn start_confined(
        path: &Path,
        backend: Arc<dyn VmControl>,
        setup: ThreadSetup,
    ) -> io::Result<(QmpServer, EventSink)> {
        if let Ok(md) = std::fs::symlink_metadata(path) {
            if md.file_type().is_socket() {
                std::fs::remove_file(path)?;
            } else {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "Failed to bind socket to {}: Address already in use",
                        path.display()
                    ),
                ));
            }
        }
        let listener = UnixListener::bind(path).map_err(|e| {
            let text = e.to_string();
            let text = text.split(" (os error").next().unwrap_or_default();
            io::Error::new(
                e.kind(),
                format!("Failed to bind socket to {}: {text}", path.display()),
            )
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
        });
        let s = shared.clone();
        let pump = spawn_set_up("qmp-events", setup.events, move || event_pump(s))?;
        let s = shared.clone();
        let accept = match spawn_set_up("qmp", setup.serve, move || {
            accept_loop(listener, s, backend)
        }) {
            Ok(a) => a,
            Err(e) => {
                // End the event thread again.
                lock(&shared.state).shutdown = true;
                shared.cond.notify_all();
                let _ = pump.join();
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        let sink = EventSink {
            shared: Some(shared.clone()),
        };
        Ok((
            QmpServer {
                shared,
                path: path.to_path_buf(),
                accept: Some(accept),
                pump: Some(pump),
            },
            sink,
        ))
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the events still queued (e.g. `SHUTDOWN`) to the client, closes the connection
    /// and the socket, and removes the socket file. Events emitted afterwards are dropped.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        {
            let mut st = lock(&self.shared.state);
            if st.shutdown {
                return;
            }
            st.shutdown = true;
            self.shared.cond.notify_all();
        }
        if let Some(p) = self.pump.take() {
            let _ = p.join();
        }
        let conn = lock(&self.shared.state).conn.clone();
        if let Some(c) = conn {
            c.kill();
        }
        // Wake the accept loop (blocked in accept()) with a connection of our own.
        let woke = UnixStream::connect(&self.path).is_ok();
        if let Some(a) = self.accept.take() {
            // Not when called from the monitor's own thread (e.g. by `VmControl::quit`).
            if woke && a.thread().id() != std::thread::current().id() {
                let _ = a.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Work run first on a server thread (see [`QmpServer::start_confined`]).
pub type ThreadInit = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// What each of the server's threads runs before it serves.
#[derive(Default)]
pub struct ThreadSetup {
    /// For the thread that accepts clients and runs their commands (`qmp`).
    pub serve: Option<ThreadInit>,
    /// For the thread that writes events (`qmp-events`).
    pub events: Option<ThreadInit>,
}

impl std::fmt::Debug for ThreadSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadSetup")
            .field("serve", &self.serve.is_some())
            .field("events", &self.events.is_some())
            .finish()
    }
}

/// Starts thread `name` running `init` then `f`; returns once `init` succeeded (Err if it
/// failed: `f` does not run).
fn spawn_set_up(
    name: &str,
    init: Option<ThreadInit>,
    f: impl FnOnce() + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let (ready, set_up) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let r = init.map_or(Ok(()), |i| i());
            let ok = r.is_ok();
            let _ = ready.send(r);
            if ok {
                f()
            }
        })?;
    match set_up.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(io::Error::other(format!("{name} thread set-up: {e}")))
        }
        Err(_) => Err(io::Error::other(format!("{name} thread ended"))),
    }
}

fn event_pump(shared: Arc<Shared>) {
    loop {
        let conn = {
            let mut st = lock(&shared.state);
            loop {
                let ready = !st.queue.is_empty() && st.negotiated && st.conn.is_some();
                if ready || st.shutdown {
                    break;
                }
                st = shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            match (&st.conn, st.queue.is_empty() || !st.negotiated) {
                (Some(c), false) => c.clone(),
                _ => return, // shut down with nothing (left) to deliver
            }
        };
        conn.flush(&shared, None);
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>, backend: Arc<dyn VmControl>) {
    loop {
        let accepted = listener.accept();
        if lock(&shared.state).shutdown {
            return;
        }
        match accepted {
            Ok((stream, _)) => serve(stream, &shared, backend.as_ref()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("qmp: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve(stream: UnixStream, shared: &Shared, backend: &dyn VmControl) {
    let (writer, mut reader) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(w), Ok(r)) => (w, r),
        _ => return,
    };
    let _ = writer.set_write_timeout(Some(WRITE_TIMEOUT));
    let conn = Arc::new(Conn {
        stream,
        writer: Mutex::new(writer),
        dead: AtomicBool::new(false),
    });
    {
        let mut st = lock(&shared.state);
        if st.shutdown {
            // Shutting down: `stop` may already have looked for a client to close.
            conn.kill();
            return;
        }
        st.conn = Some(conn.clone());
        st.negotiated = false;
        st.queue.clear();
    }
    conn.flush(shared, Some(&greeting().to_string()));
    let mut streamer = Streamer::new(MAX_MESSAGE_SIZE);
    let mut buf = vec![0u8; 64 * 1024];
    let mut chunks = Vec::new();
    'conn: while !conn.is_dead() {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        chunks.clear();
        streamer.feed(&buf[..n], &mut chunks);
        for chunk in chunks.drain(..) {
            if conn.is_dead() {
                break 'conn;
            }
            let request = match chunk {
                Chunk::Message(bytes) => parse_message(&bytes),
                Chunk::TooBig => {
                    let e = commands::error_response(
                        &CommandError::generic("JSON token size limit exceeded"),
                        None,
                    );
                    conn.flush(shared, Some(&e.to_string()));
                    break 'conn;
                }
            };
            let negotiated = lock(&shared.state).negotiated;
            // A panicking backend must not take the monitor down.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                commands::dispatch(backend, request, negotiated)
            }));
            let Outcome {
                response,
                negotiated: now_negotiated,
                quit,
            } = outcome.unwrap_or_else(|_| Outcome {
                response: commands::error_response(
                    &CommandError::generic("internal error: the command failed"),
                    None,
                ),
                negotiated: false,
                quit: false,
            });
            conn.flush(shared, Some(&response.to_string()));
            if now_negotiated {
                lock(&shared.state).negotiated = true;
            }
            if quit {
                backend.quit();
            }
        }
    }
    {
        let mut st = lock(&shared.state);
        if st.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
            st.conn = None;
            st.negotiated = false;
            st.queue.clear();
        }
    }
    conn.kill();
}

/// Parses one framed message; errors as QEMU words them.
pub fn parse_message(bytes: &[u8]) -> Result<Value, CommandError> {
    if let [c @ (b'}' | b']')] = bytes {
        return Err(CommandError::generic(format!(
            "JSON parse error, stray '{}'",
            *c as char
        )));
    }
    if !bytes.is_empty()
        && bytes.iter().all(u8::is_ascii_alphabetic)
        && !matches!(bytes, b"true" | b"false" | b"null")
    {
        return Err(CommandError::generic(format!(
            "JSON parse error, invalid keyword '{}'",
            String::from_utf8_lossy(bytes)
        )));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        let msg = e.to_string();
        let what = [
            ("expected value", "expecting value"),
            ("key must be a string", "key is not a string in object"),
            ("expected `:`", "missing : in object pair"),
            ("expected `,` or `}`", "expected separator in dict"),
            ("expected `,` or `]`", "expected separator in list"),
            ("recursion limit exceeded", "nesting depth limit exceeded"),
        ]
        .iter()
        .find(|(serde, _)| msg.starts_with(serde))
        .map(|(_, qemu)| *qemu);
        match what {
            Some("nesting depth limit exceeded") => {
                CommandError::generic("JSON nesting depth limit exceeded")
            }
            Some(w) => CommandError::generic(format!("JSON parse error, {w}")),
            None => CommandError::generic("Invalid JSON syntax"),
        }
    })
}

/// A framed piece of input.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    /// One complete message (not yet parsed).
    Message(Vec<u8>),
    /// The message being read grew past the limit.
    TooBig,
}

/// Splits a byte stream into JSON messages like QEMU's JSON streamer: by `{}`/`[]` nesting
/// outside strings; a top-level scalar ends at whitespace or at the next structural char.
#[derive(Debug)]
pub struct Streamer {
    buf: Vec<u8>,
    depth: usize,
    in_str: bool,
    esc: bool,
    max: usize,
    failed: bool,
}

impl Streamer {
    /// A streamer for messages of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Streamer {
            buf: Vec::new(),
            depth: 0,
            in_str: false,
            esc: false,
            max,
            failed: false,
        }
    }

    fn emit(&mut self, out: &mut Vec<Chunk>) {
        if self.buf.len() > self.max {
            // The byte that completed the message made it one too many.
            self.buf = Vec::new();
            self.failed = true;
            out.push(Chunk::TooBig);
        } else if !self.buf.is_empty() {
            out.push(Chunk::Message(std::mem::take(&mut self.buf)));
        }
        self.depth = 0;
    }

    /// Feeds bytes; complete messages are appended to `out`. After [`Chunk::TooBig`] the
    /// streamer ignores all further input.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Chunk>) {
        for &b in data {
            if self.failed {
                return;
            }
            if self.in_str && b < 0x20 {
                // A raw control character cannot be in a JSON string: end the broken message
                // here (a newline resynchronizes after an unterminated string).
                self.in_str = false;
                self.esc = false;
                self.emit(out);
                continue;
            }
            if self.in_str {
                self.buf.push(b);
                if self.esc {
                    self.esc = false;
                } else if b == b'\\' {
                    self.esc = true;
                } else if b == b'"' {
                    self.in_str = false;
                    if self.depth == 0 {
                        self.emit(out);
                    }
                }
            } else {
                match b {
                    b' ' | b'\t' | b'\r' | b'\n' => {
                        if self.depth == 0 {
                            self.emit(out);
                        } else {
                            self.buf.push(b);
                        }
                    }
                    b'{' | b'[' => {
                        if self.depth == 0 {
                            self.emit(out);
                        }
                        self.depth += 1;
                        self.buf.push(b);
                    }
                    b'}' | b']' => {
                        if self.depth == 0 {
                            self.emit(out);
                            self.buf.push(b);
                            self.emit(out);
                        } else {
                            self.depth -= 1;
                            self.buf.push(b);
                            if self.depth == 0 {
                                self.emit(out);
                            }
                        }
                    }
                    b'"' => {
                        if self.depth == 0 {
                            self.emit(out);
                        }
                        self.in_str = true;
                        self.buf.push(b);
                    }
                    _ => self.buf.push(b),
                }
            }
            if self.buf.len() > self.max {
                self.buf = Vec::new();
                self.failed = true;
                out.push(Chunk::TooBig);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_message_one_byte_over_the_limit_is_refused() {
        let mut st = Streamer::new(8);
        let mut out = Vec::new();
        st.feed(br#"{"a":12}"#, &mut out); // exactly 8 bytes
        assert!(matches!(out.as_slice(), [Chunk::Message(m)] if m.len() == 8));
        let mut st = Streamer::new(8);
        let mut out = Vec::new();
        st.feed(br#"{"a":123}"#, &mut out); // 9 bytes, completed by its last byte
        assert!(matches!(out.as_slice(), [Chunk::TooBig]), "{}", out.len());
    }
    use super::*;

    fn split(input: &[u8]) -> Vec<Chunk> {
        let mut s = Streamer::new(64);
        let mut out = Vec::new();
        for b in input {
            s.feed(std::slice::from_ref(b), &mut out);
        }
        out
    }

    fn msg(s: &str) -> Chunk {
        Chunk::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn framing() {
        assert_eq!(
            split(br#"{"a": "}{"}{"b":[1,{}]} 42 "x"]"#),
            vec![
                msg(r#"{"a": "}{"}"#),
                msg(r#"{"b":[1,{}]}"#),
                msg("42"),
                msg(r#""x""#),
                msg("]"),
            ]
        );
        assert_eq!(
            split(b"{\"a\": \"\\\"}\"}\n"),
            vec![msg("{\"a\": \"\\\"}\"}")]
        );
        assert_eq!(split(b"   \n\n  "), vec![]);
        assert_eq!(
            split(b"{\"a\": \"x\n{}"),
            vec![msg("{\"a\": \"x"), msg("{}")]
        );
        let big = vec![b'['; 100];
        assert_eq!(split(&big), vec![Chunk::TooBig]);
    }

    #[test]
    fn parse_errors() {
        for (input, desc) in [
            (&b"{\"execute\": }"[..], "JSON parse error, expecting value"),
            (b"}", "JSON parse error, stray '}'"),
            (b"hello", "JSON parse error, invalid keyword 'hello'"),
            (b"{\"a\" 1}", "JSON parse error, missing : in object pair"),
            (
                b"{\"a\": 1 2}",
                "JSON parse error, expected separator in dict",
            ),
        ] {
            assert_eq!(parse_message(input).unwrap_err().desc, desc);
        }
        assert_eq!(parse_message(b"-").unwrap_err().desc, "Invalid JSON syntax");
        assert_eq!(
            parse_message(b"\xff\xfe").unwrap_err().class,
            "GenericError"
        );
    }

    #[test]
    fn event_format() {
        let at = UNIX_EPOCH + Duration::new(1700000000, 123_456_789);
        let v: Value = serde_json::from_str(&event_line("STOP", Value::Null, at)).unwrap();
        assert_eq!(
            v,
            json!({"event": "STOP", "timestamp": {"seconds": 1700000000u64, "microseconds": 123456}})
        );
    }
}
