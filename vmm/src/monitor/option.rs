//! The `--qmp` option and QemuOpts-style option splitting.

use std::path::PathBuf;

/// Parses the value of `--qmp`: `unix:PATH[,server[=on]][,wait=off|,nowait]`, returns PATH.
///
/// Only a listening unix socket that does not wait for a client is supported; other forms get
/// a QEMU-like error text.
pub fn parse_qmp_option(s: &str) -> Result<PathBuf, String> {
    let mut parts = split_opts(s).into_iter();
    let first = parts.next().unwrap_or_default();
    let Some(path) = first.strip_prefix("unix:") else {
        let backend = first.split(':').next().unwrap_or_default();
        return Err(match backend {
            "" => "chardev: empty QMP option".to_string(),
            "tcp" | "telnet" | "udp" | "stdio" | "pty" | "null" | "vc" | "file" | "pipe"
            | "mon" | "websocket" | "serial" | "chardev" => format!(
                "'{backend}' is not supported for --qmp: use unix:PATH[,server=on,wait=off]"
            ),
            _ => format!("'{first}' is not a valid char driver"),
        });
    };
    if path.is_empty() {
        return Err("chardev: socket: no local path given (unix:PATH)".to_string());
    }
    for opt in parts {
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match opt.strip_prefix("no") {
                Some(k) if k == "wait" || k == "server" => (k.to_string(), "off".to_string()),
                _ => (opt.clone(), "on".to_string()),
            },
        };
        if k != "server" && k != "wait" {
            return Err(format!("Invalid parameter '{k}'"));
        }
        let on = match v.as_str() {
            "on" | "yes" | "true" => true,
            "off" | "no" | "false" => false,
            _ => return Err(format!("Parameter '{k}' expects 'on' or 'off'")),
        };
        match k.as_str() {
            "server" if on => {}
            "server" => return Err("--qmp: only server mode (server=on) is supported".to_string()),
            "wait" if !on => {}
            "wait" => {
                return Err(
                    "--qmp: wait=on is not supported: use wait=off (start with -S to wait)"
                        .to_string(),
                )
            }
            _ => {}
        }
    }
    Ok(PathBuf::from(path))
}

/// Splits QemuOpts-style `a,b=c` on single commas; `,,` stands for a literal comma.
pub fn split_opts(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_option_forms() {
        assert_eq!(
            parse_qmp_option("unix:/tmp/q.sock").unwrap(),
            PathBuf::from("/tmp/q.sock")
        );
        assert_eq!(
            parse_qmp_option("unix:/tmp/q.sock,server=on,wait=off").unwrap(),
            PathBuf::from("/tmp/q.sock")
        );
        assert_eq!(
            parse_qmp_option("unix:/tmp/q.sock,server,nowait").unwrap(),
            PathBuf::from("/tmp/q.sock")
        );
        assert_eq!(
            parse_qmp_option("unix:/tmp/a,,b.sock").unwrap(),
            PathBuf::from("/tmp/a,b.sock")
        );
        assert!(parse_qmp_option("tcp:localhost:4444")
            .unwrap_err()
            .contains("'tcp' is not supported"));
        assert!(parse_qmp_option("unix:").is_err());
        assert!(parse_qmp_option("unix:/x,server=off").is_err());
        assert!(parse_qmp_option("unix:/x,wait=on").is_err());
        assert_eq!(
            parse_qmp_option("unix:/x,server=maybe").unwrap_err(),
            "Parameter 'server' expects 'on' or 'off'"
        );
        assert_eq!(
            parse_qmp_option("unix:/x,foo=on").unwrap_err(),
            "Invalid parameter 'foo'"
        );
        assert!(parse_qmp_option("bogus").is_err());
    }
}
