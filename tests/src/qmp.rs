//! A small QMP client for the tests: greeting, negotiation, commands, and the events read past
//! while waiting for a reply (kept in [`Client::events`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// One QMP connection.
pub struct Client {
    /// The reading side.
    pub r: BufReader<UnixStream>,
    /// The writing side (tests write raw bytes to it, e.g. half a message).
    pub w: UnixStream,
    /// Events read while waiting for replies, in order.
    pub events: Vec<Value>,
}

impl Client {
    /// Connects and reads the greeting (capabilities not negotiated).
    pub fn connect(sock: &Path) -> Client {
        let s = UnixStream::connect(sock).unwrap();
        // Only catches a hang: every reply comes at once.
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut c = Client {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
            events: vec![],
        };
        let g = c.line();
        assert!(g["QMP"]["version"]["qemu"].is_object(), "greeting: {g}");
        c
    }

    /// Connects and negotiates capabilities.
    pub fn negotiated(sock: &Path) -> Client {
        let mut c = Client::connect(sock);
        let r = c.cmd(json!({"execute": "qmp_capabilities"}));
        assert_eq!(r["return"], json!({}), "{r}");
        c
    }

    /// The next line, as JSON.
    pub fn line(&mut self) -> Value {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l:?}: {e}"))
    }

    /// Writes `s` as it is; returns the next reply (events go to [`Client::events`]).
    pub fn raw(&mut self, s: &str) -> Value {
        self.w.write_all(s.as_bytes()).unwrap();
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// Sends `v`, returns its reply.
    pub fn cmd(&mut self, v: Value) -> Value {
        self.raw(&format!("{v}\n"))
    }

    /// [`Client::cmd`] that must return `{}`.
    pub fn ok(&mut self, v: Value) {
        let r = self.cmd(v.clone());
        assert_eq!(r["return"], json!({}), "{v} -> {r}");
    }

    /// An HMP command's text.
    pub fn hmp(&mut self, line: &str) -> String {
        let r = self
            .cmd(json!({"execute": "human-monitor-command", "arguments": {"command-line": line}}));
        r["return"]
            .as_str()
            .unwrap_or_else(|| panic!("{line}: {r}"))
            .to_string()
    }

    /// `query-status`'s status.
    pub fn status(&mut self) -> Value {
        self.cmd(json!({"execute": "query-status"}))["return"]["status"].clone()
    }
}
