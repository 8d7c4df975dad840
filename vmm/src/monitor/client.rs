//! `vmm qmp SOCKET COMMAND...`: a minimal QMP client for scripts (no Python needed).
//!
//! Connects, negotiates capabilities, then sends each COMMAND in order: a JSON object is sent
//! as it is, a bare word `cmd` as `{"execute": "cmd"}`. Prints every reply (and any event that
//! arrives before it) as one JSON line. Exit status: 0 when every command returned, 1 when one
//! got an error, 2 when the monitor could not be reached.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

fn read_reply(r: &mut impl BufRead) -> std::io::Result<Value> {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("the monitor closed the connection"));
        }
        let v: Value = serde_json::from_str(line.trim())
            .map_err(|e| std::io::Error::other(format!("bad reply {line:?}: {e}")))?;
        if v.get("return").is_some() || v.get("error").is_some() {
            return Ok(v);
        }
        println!("{v}");
    }
}

/// Runs the client; returns the exit status.
pub fn run(socket: &Path, commands: &[String]) -> i32 {
    let mut failed = false;
    let result = (|| -> std::io::Result<()> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut w = stream.try_clone()?;
        let mut r = BufReader::new(stream);
        let mut greeting = String::new();
        r.read_line(&mut greeting)?;
        w.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")?;
        read_reply(&mut r)?;
        for c in commands {
            let msg = if c.trim_start().starts_with('{') {
                c.clone()
            } else {
                serde_json::json!({ "execute": c }).to_string()
            };
            w.write_all(msg.as_bytes())?;
            w.write_all(b"\n")?;
            let v = read_reply(&mut r)?;
            failed |= v.get("error").is_some();
            println!("{v}");
        }
        Ok(())
    })();
    match result {
        Ok(()) => i32::from(failed),
        Err(e) => {
            eprintln!("vmm qmp: {}: {e}", socket.display());
            2
        }
    }
}
