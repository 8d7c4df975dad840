//! QMP over a real unix socket, against a mock machine.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use vmm::device_config::{parse_device, DeviceSpec};
use vmm::monitor::{
    CommandError, EventSink, PciFunctionInfo, QmpServer, RunState, VmControl, MAX_MESSAGE_SIZE,
};

/// A `device_add` call, parsed as the real machine parses it.
type Added = DeviceSpec;

#[derive(Default)]
struct Mock {
    state: Mutex<Option<RunState>>,
    calls: Mutex<Vec<String>>,
    added: Mutex<Vec<Added>>,
    events: OnceLock<EventSink>,
    /// When set, `quit` shuts the server down from the monitor's own thread.
    server: Mutex<Option<QmpServer>>,
}

impl Mock {
    fn sink(&self) -> &EventSink {
        self.events.get().expect("sink set")
    }
    fn call(&self, c: &str) {
        self.calls.lock().unwrap().push(c.to_string());
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl VmControl for Mock {
    fn status(&self) -> RunState {
        self.state.lock().unwrap().unwrap_or(RunState::Prelaunch)
    }
    fn cont(&self) -> Result<(), CommandError> {
        self.call("cont");
        *self.state.lock().unwrap() = Some(RunState::Running);
        self.sink().resume();
        Ok(())
    }
    fn stop(&self) -> Result<(), CommandError> {
        self.call("stop");
        *self.state.lock().unwrap() = Some(RunState::Paused);
        self.sink().stop();
        Ok(())
    }
    fn system_reset(&self) -> Result<(), CommandError> {
        self.call("system_reset");
        self.sink().reset(false, "host-qmp-system-reset");
        Ok(())
    }
    fn quit(&self) {
        self.call("quit");
        *self.state.lock().unwrap() = Some(RunState::Shutdown);
        self.sink().shutdown(false, "host-qmp-quit");
        if let Some(server) = self.server.lock().unwrap().take() {
            server.shutdown();
        }
    }
    fn pci_functions(&self) -> Vec<PciFunctionInfo> {
        vec![
            PciFunctionInfo {
                revision: 1,
                props: vec![("vectors".into(), "2".into())],
                ..vmm::monitor::testing::virtio_rng_info()
            },
            PciFunctionInfo {
                class: 0x0600,
                vendor: 0x1b36,
                device: 0x0008,
                subsystem_vendor: 0x1af4,
                subsystem: 0x1100,
                driver: "gpex-root".into(),
                ..Default::default()
            },
        ]
    }
    fn device_add(&self, args: &Map<String, Value>) -> Result<(), CommandError> {
        let spec = DeviceSpec::from_qmp(args).map_err(|e| CommandError::generic(e.to_string()))?;
        self.added.lock().unwrap().push(spec);
        Ok(())
    }
    fn device_del(&self, id: &str) -> Result<(), CommandError> {
        if id != "rng0" {
            return Err(CommandError::device_not_found(id));
        }
        self.sink()
            .device_deleted(Some(id), &format!("/machine/peripheral/{id}"));
        Ok(())
    }
    fn query_compat(&self) -> Result<Value, CommandError> {
        Ok(json!({"version": 1, "devices": []}))
    }
    fn save_compat(&self, path: &str) -> Result<(), CommandError> {
        self.call(&format!("save_compat {path}"));
        if path.is_empty() {
            return Err(CommandError::generic("cannot write ''"));
        }
        Ok(())
    }
    fn query_machine(&self) -> Result<Value, CommandError> {
        Ok(json!({"memory": 256}))
    }
    fn dump_machine(&self, path: &str) -> Result<(), CommandError> {
        self.call(&format!("dump_machine {path}"));
        if path == "probe-seccomp" {
            // A file (allowed on the QMP thread), then an inet socket (not allowed).
            std::fs::File::open("/etc/hostname")
                .map_err(|e| CommandError::generic(format!("open: {e}")))?;
            std::net::TcpListener::bind("127.0.0.1:0")
                .map_err(|e| CommandError::generic(format!("inet socket: {e}")))?;
        }
        Ok(())
    }
    fn device_reports(&self) -> Vec<(pci::PciAddress, String, String)> {
        vec![(
            pci::PciAddress::new(0, 5, 0).unwrap(),
            "rng0".into(),
            "  status 0x0f (activated)\n".into(),
        )]
    }
}

fn sock_path(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vmm-qmp-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn start(name: &str) -> (QmpServer, Arc<Mock>, PathBuf) {
    let path = sock_path(name);
    let mock = Arc::new(Mock::default());
    let (server, sink) = QmpServer::start(&path, mock.clone()).unwrap();
    mock.events.set(sink).unwrap();
    (server, mock, path)
}

struct Client {
    r: BufReader<UnixStream>,
    w: UnixStream,
    events: Vec<Value>,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            events: Vec::new(),
        }
    }

    /// Connects and checks the greeting.
    fn greeted(path: &Path) -> Client {
        let mut c = Client::connect(path);
        let g = c.recv();
        assert!(g.get("QMP").is_some(), "{g}");
        c
    }

    fn negotiated(path: &Path) -> Client {
        let mut c = Client::greeted(path);
        assert_eq!(
            c.cmd(json!({"execute": "qmp_capabilities"})),
            json!({"return": {}})
        );
        c
    }

    fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.r.read_line(&mut line).unwrap();
        assert!(n > 0, "unexpected EOF");
        assert!(line.ends_with('\n'));
        serde_json::from_str(&line).unwrap()
    }

    fn send_raw(&mut self, b: &[u8]) {
        self.w.write_all(b).unwrap();
    }

    /// Next reply, keeping events aside.
    fn reply(&mut self) -> Value {
        loop {
            let v = self.recv();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    fn cmd(&mut self, v: Value) -> Value {
        self.send_raw(format!("{v}\n").as_bytes());
        self.reply()
    }

    fn raw(&mut self, b: &str) -> Value {
        self.send_raw(b.as_bytes());
        self.reply()
    }

    fn event(&mut self, name: &str) -> Value {
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return self.events.remove(i);
            }
            let v = self.recv();
            assert!(v.get("event").is_some(), "expected event {name}, got {v}");
            self.events.push(v);
        }
    }

    fn assert_eof(&mut self) {
        let mut buf = Vec::new();
        // Whatever was still buffered, then EOF (or a reset).
        let _ = self.r.read_to_end(&mut buf);
    }
}

fn err(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

fn err_id(class: &str, desc: &str, id: Value) -> Value {
    json!({"error": {"class": class, "desc": desc}, "id": id})
}

fn check_timestamp(e: &Value) {
    let t = &e["timestamp"];
    assert!(t["seconds"].as_u64().unwrap() > 1_600_000_000, "{e}");
    assert!(t["microseconds"].as_u64().unwrap() < 1_000_000, "{e}");
}

#[test]
fn greeting_and_negotiation() {
    let (server, mock, path) = start("q.sock");
    let md = std::fs::metadata(&path).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o600);

    let mut c = Client::connect(&path);
    assert_eq!(
        c.recv(),
        json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
               "package": format!("vmm-{}", env!("CARGO_PKG_VERSION"))}, "capabilities": []}})
    );
    let expecting = "Expecting capabilities negotiation with 'qmp_capabilities'";
    assert_eq!(
        c.cmd(json!({"execute": "query-status"})),
        err("CommandNotFound", expecting)
    );
    assert_eq!(
        c.cmd(json!({"execute": "no-such-thing", "id": 7})),
        err_id("CommandNotFound", expecting, json!(7))
    );
    assert_eq!(
        c.cmd(json!([1, 2])),
        err("GenericError", "QMP input must be a JSON object")
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})),
        err("GenericError", "Capability 'oob' not available")
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities", "arguments": {"bogus": 1}})),
        err("GenericError", "Parameter 'bogus' is unexpected")
    );
    // Not negotiated: no events.
    mock.sink().stop();
    assert_eq!(
        c.cmd(
            json!({"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": {"x": [1]}})
        ),
        json!({"return": {}, "id": {"x": [1]}})
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities"})),
        err(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored"
        )
    );
    assert_eq!(
        c.cmd(json!({"execute": "query-status", "id": "a"})),
        json!({"return": {"running": false, "singlestep": false, "status": "prelaunch"}, "id": "a"})
    );
    assert!(c.events.is_empty(), "{:?}", c.events);
    drop(c);
    server.shutdown();
    assert!(!path.exists());
}

#[test]
fn run_state_commands_and_events() {
    let (server, mock, path) = start("q.sock");
    let mut c = Client::negotiated(&path);
    assert_eq!(
        c.cmd(json!({"execute": "cont", "id": 1})),
        json!({"return": {}, "id": 1})
    );
    let e = c.event("RESUME");
    assert!(e.get("data").is_none(), "{e}");
    check_timestamp(&e);
    assert_eq!(
        c.cmd(json!({"execute": "query-status"}))["return"],
        json!({"running": true, "singlestep": false, "status": "running"})
    );
    assert_eq!(c.cmd(json!({"execute": "stop"})), json!({"return": {}}));
    check_timestamp(&c.event("STOP"));
    assert_eq!(
        c.cmd(json!({"execute": "query-status"}))["return"]["status"],
        "paused"
    );
    assert_eq!(
        c.cmd(json!({"execute": "system_reset"})),
        json!({"return": {}})
    );
    let e = c.event("RESET");
    assert_eq!(
        e["data"],
        json!({"guest": false, "reason": "host-qmp-system-reset"})
    );
    assert_eq!(
        c.cmd(json!({"execute": "cont", "arguments": {"x": 1}})),
        err("GenericError", "Parameter 'x' is unexpected")
    );
    // Events from another thread.
    let sink = mock.sink().clone();
    std::thread::spawn(move || sink.emit("MY_EVENT", json!({"n": 1})))
        .join()
        .unwrap();
    let e = c.event("MY_EVENT");
    assert_eq!(e["data"], json!({"n": 1}));
    check_timestamp(&e);
    // quit: the reply first, then SHUTDOWN.
    c.send_raw(b"{\"execute\": \"quit\"}\n");
    assert_eq!(c.recv(), json!({"return": {}}));
    let e = c.event("SHUTDOWN");
    assert_eq!(
        e["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_eq!(mock.calls(), vec!["cont", "stop", "system_reset", "quit"]);
    server.shutdown();
    c.assert_eof();
}

#[test]
fn query_pci_and_hmp() {
    let (server, mock, path) = start("q.sock");
    let mut c = Client::negotiated(&path);
    let r = c.cmd(json!({"execute": "query-pci"}));
    assert_eq!(
        r,
        json!({"return": [{"bus": 0, "devices": [
            {"bus": 0, "slot": 0, "function": 0,
             "class_info": {"class": 1536, "desc": "Host bridge"},
             "id": {"device": 8, "vendor": 6966, "subsystem": 4352, "subsystem-vendor": 6900},
             "irq_pin": 0, "qdev_id": "", "regions": []},
            {"bus": 0, "slot": 5, "function": 0,
             "class_info": {"class": 255},
             "id": {"device": 4164, "vendor": 6900, "subsystem": 4352, "subsystem-vendor": 6900},
             "irq": 0, "irq_pin": 1, "qdev_id": "rng0",
             "regions": [
                {"bar": 1, "type": "memory", "address": 3221258240u64, "size": 4096,
                 "prefetch": false, "mem_type_64": false},
                {"bar": 4, "type": "memory", "address": 3221274624u64, "size": 16384,
                 "prefetch": true, "mem_type_64": true}]}
        ]}]})
    );
    let hmp = |c: &mut Client, line: &str| -> String {
        let r = c.cmd(json!({"execute": "human-monitor-command",
                             "arguments": {"command-line": line}}));
        r["return"]
            .as_str()
            .unwrap_or_else(|| panic!("{r}"))
            .to_string()
    };
    assert_eq!(
        hmp(&mut c, "info pci"),
        "  Bus  0, device   0, function 0:\r\n    Host bridge: PCI device 1b36:0008\r\n      PCI subsystem 1af4:1100\r\n      id \"\"\r\n  Bus  0, device   5, function 0:\r\n    Class 0255: PCI device 1af4:1044\r\n      PCI subsystem 1af4:1100\r\n      IRQ 0, pin A\r\n      BAR1: 32 bit memory at 0xc0008000 [0xc0008fff].\r\n      BAR4: 64 bit prefetchable memory at 0xc000c000 [0xc000ffff].\r\n      id \"rng0\"\r\n"
    );
    let qtree = hmp(&mut c, "info qtree");
    assert!(
        qtree.starts_with("bus: main-system-bus\r\n  type System\r\n"),
        "{qtree}"
    );
    assert!(
        qtree.contains("      dev: virtio-rng-pci, id \"rng0\"\r\n        addr = 05.0\r\n        vectors = 2\r\n        class Class 00ff, addr 00:05.0, pci id 1af4:1044 (sub 1af4:1100)\r\n        bar 1: mem at 0xc0008000 [0xc0008fff]\r\n"),
        "{qtree}"
    );
    assert_eq!(
        hmp(&mut c, "info status"),
        "VM status: paused (prelaunch)\r\n"
    );
    assert_eq!(
        hmp(&mut c, "info virtio"),
        "00:05.0 id \"rng0\"\r\n  status 0x0f (activated)\r\n"
    );
    assert_eq!(
        hmp(&mut c, "frobnicate 1"),
        "unknown command: 'frobnicate'\r\n"
    );
    assert_eq!(hmp(&mut c, "info frob"), "unknown command: 'info frob'\r\n");
    assert_eq!(hmp(&mut c, ""), "");
    assert_eq!(
        hmp(&mut c, "info pci extra"),
        "pci: extraneous characters at the end of line\r\n"
    );
    assert_eq!(
        hmp(&mut c, "stop now"),
        "stop: extraneous characters at the end of line\r\n"
    );
    assert!(hmp(&mut c, "info").contains("info pci  -- show PCI info\r\n"));
    assert!(hmp(&mut c, "help").contains("device_del device -- remove device\r\n"));
    assert_eq!(
        hmp(&mut c, "device_add virtio-foo-pci,id=x"),
        "Error: 'virtio-foo-pci' is not a valid device model name\r\n"
    );
    assert_eq!(hmp(&mut c, "device_add virtio-rng-pci,id=r2,addr=6"), "");
    assert_eq!(
        hmp(
            &mut c,
            "device_add virtio-blk-pci,id=h,file=/tmp/h,,1.img,readonly"
        ),
        ""
    );
    assert_eq!(
        mock.added.lock().unwrap().last().unwrap(),
        &parse_device("virtio-blk-pci,id=h,file=/tmp/h,,1.img,readonly=on").unwrap()
    );
    assert_eq!(
        hmp(&mut c, "device_add virtio-rng-pci,id=a,id=b"),
        "Error: Parameter 'id' given more than once\r\n"
    );
    assert_eq!(
        hmp(&mut c, "device_del nope"),
        "Error: Device 'nope' not found\r\n"
    );
    assert_eq!(
        c.cmd(json!({"execute": "human-monitor-command"})),
        err("GenericError", "Parameter 'command-line' is missing")
    );
    assert_eq!(
        c.cmd(json!({"execute": "human-monitor-command", "arguments": {"command-line": 5}})),
        err(
            "GenericError",
            "Invalid parameter type for 'command-line', expected: string"
        )
    );
    server.shutdown();
}

#[test]
fn device_add_and_del() {
    let (server, mock, path) = start("q.sock");
    let mut c = Client::negotiated(&path);
    assert_eq!(
        c.cmd(json!({"execute": "device_add", "arguments":
            {"driver": "virtio-rng-pci", "id": "rng1", "addr": "06.0", "vectors": 4,
             "multifunction": true}, "id": 3})),
        json!({"return": {}, "id": 3})
    );
    // JSON types kept: the same device as the --device text, whatever the spelling.
    let want = parse_device("virtio-rng-pci,id=rng1,addr=06.0,vectors=4,multifunction=on").unwrap();
    assert_eq!(mock.added.lock().unwrap()[0], want);
    assert_eq!(
        c.cmd(json!({"execute": "device_add", "arguments":
            {"driver": "virtio-rng-pci", "id": "rng1", "addr": "06.0", "vectors": "4",
             "multifunction": "on"}})),
        json!({"return": {}})
    );
    assert_eq!(mock.added.lock().unwrap()[1], want);
    // A comma in a value is just a character: nothing is joined into option text.
    assert_eq!(
        c.cmd(json!({"execute": "device_add", "arguments":
            {"driver": "virtio-blk-pci", "id": "d", "file": "/tmp/a,b.img", "readonly": true}})),
        json!({"return": {}})
    );
    assert_eq!(
        mock.added.lock().unwrap()[2],
        parse_device("virtio-blk-pci,id=d,file=/tmp/a,,b.img,readonly=on").unwrap()
    );
    assert_eq!(
        c.cmd(json!({"execute": "device_add", "arguments":
            {"driver": "virtio-rng-pci", "vectors": true}})),
        err(
            "GenericError",
            "Invalid parameter type for 'vectors', expected: integer"
        )
    );
    assert_eq!(
        c.cmd(json!({"execute": "device_add", "arguments":
            {"driver": "virtio-blk-pci", "file": "/x", "readonly": 1}})),
        err(
            "GenericError",
            "Invalid parameter type for 'readonly', expected: boolean"
        )
    );
    assert_eq!(
        c.cmd(json!({"execute": "device_add", "arguments":
            {"driver": "virtio-rng-pci", "vectors": "lots"}})),
        err(
            "GenericError",
            &format!(
                "Property 'virtio-rng-pci.vectors' can't take value 'lots': expected a number from 0 to {}",
                devices::virtio::pci::MAX_VECTORS
            )
        )
    );
    assert_eq!(
        c.cmd(json!({"execute": "device_add", "arguments": {"id": "x"}})),
        err("GenericError", "Parameter 'driver' is missing")
    );
    assert_eq!(
        c.cmd(json!({"execute": "device_add", "arguments": {"driver": 1}})),
        err(
            "GenericError",
            "Invalid parameter type for 'driver', expected: string"
        )
    );
    assert_eq!(
        c.cmd(json!({"execute": "device_add", "arguments": {"driver": "virtio-rng-pci", "id": 5}})),
        err(
            "GenericError",
            "Invalid parameter type for 'id', expected: string"
        )
    );
    assert_eq!(
        c.cmd(json!({"execute": "device_add", "arguments": {"driver": "e1000"}})),
        err("GenericError", "'e1000' is not a valid device model name")
    );
    assert_eq!(
        c.cmd(json!({"execute": "device_del"})),
        err("GenericError", "Parameter 'id' is missing")
    );
    assert_eq!(
        c.cmd(json!({"execute": "device_del", "arguments": {"id": "ghost"}})),
        err("DeviceNotFound", "Device 'ghost' not found")
    );
    assert_eq!(
        c.cmd(json!({"execute": "device_del", "arguments": {"id": "rng0"}})),
        json!({"return": {}})
    );
    let e = c.event("DEVICE_DELETED");
    assert_eq!(
        e["data"],
        json!({"device": "rng0", "path": "/machine/peripheral/rng0"})
    );
    check_timestamp(&e);
    server.shutdown();
}

#[test]
fn compat_and_machine_commands() {
    let (server, mock, path) = start("q.sock");
    let mut c = Client::negotiated(&path);
    assert_eq!(
        c.cmd(json!({"execute": "query-compat"})),
        json!({"return": {"version": 1, "devices": []}})
    );
    assert_eq!(
        c.cmd(json!({"execute": "query-machine"})),
        json!({"return": {"memory": 256}})
    );
    assert_eq!(
        c.cmd(json!({"execute": "save-compat", "arguments": {"path": "/tmp/c.json"}})),
        json!({"return": {}})
    );
    assert_eq!(
        c.cmd(json!({"execute": "save-compat", "arguments": {"path": ""}})),
        err("GenericError", "cannot write ''")
    );
    assert_eq!(
        c.cmd(json!({"execute": "save-compat"})),
        err("GenericError", "Parameter 'path' is missing")
    );
    assert_eq!(
        c.cmd(json!({"execute": "dump-machine", "arguments": {"path": ["x"]}})),
        err(
            "GenericError",
            "Invalid parameter type for 'path', expected: string"
        )
    );
    assert_eq!(
        c.cmd(json!({"execute": "dump-machine", "arguments": {"path": "/tmp/m.json", "x": 1}})),
        err("GenericError", "Parameter 'x' is unexpected")
    );
    assert_eq!(
        c.cmd(json!({"execute": "dump-machine", "arguments": {"path": "/tmp/m.json"}})),
        json!({"return": {}})
    );
    assert_eq!(
        mock.calls(),
        vec![
            "save_compat /tmp/c.json",
            "save_compat ",
            "dump_machine /tmp/m.json"
        ]
    );
    let v = c.cmd(json!({"execute": "query-version"}));
    assert_eq!(
        v["return"]["qemu"],
        json!({"major": 7, "minor": 2, "micro": 0})
    );
    let cmds = c.cmd(json!({"execute": "query-commands"}));
    assert!(cmds["return"]
        .as_array()
        .unwrap()
        .contains(&json!({"name": "device_add"})));
    server.shutdown();
}

#[test]
fn request_errors() {
    let (server, _mock, path) = start("q.sock");
    let mut c = Client::negotiated(&path);
    assert_eq!(
        c.raw("{\"execute\": }\n"),
        err("GenericError", "JSON parse error, expecting value")
    );
    assert_eq!(
        c.raw("{\"execute\" \"stop\"}"),
        err("GenericError", "JSON parse error, missing : in object pair")
    );
    assert_eq!(
        c.raw("nonsense\n"),
        err(
            "GenericError",
            "JSON parse error, invalid keyword 'nonsense'"
        )
    );
    assert_eq!(
        c.raw("}"),
        err("GenericError", "JSON parse error, stray '}'")
    );
    assert_eq!(
        c.raw("42\n"),
        err("GenericError", "QMP input must be a JSON object")
    );
    assert_eq!(
        c.raw("\"query-status\"\n"),
        err("GenericError", "QMP input must be a JSON object")
    );
    assert_eq!(
        c.cmd(json!({"execute": "frob", "id": "x1"})),
        err_id(
            "CommandNotFound",
            "The command frob has not been found",
            json!("x1")
        )
    );
    assert_eq!(
        c.cmd(json!({"execute": 1})),
        err(
            "GenericError",
            "QMP input member 'execute' must be a string"
        )
    );
    assert_eq!(
        c.cmd(json!({"execute": "stop", "arguments": [], "id": 2})),
        err_id(
            "GenericError",
            "QMP input member 'arguments' must be an object",
            json!(2)
        )
    );
    assert_eq!(
        c.cmd(json!({"execute": "stop", "foo": 1})),
        err("GenericError", "QMP input member 'foo' is unexpected")
    );
    assert_eq!(
        c.cmd(json!({"exec-oob": "stop"})),
        err("GenericError", "QMP input member 'exec-oob' is unexpected")
    );
    assert_eq!(
        c.cmd(json!({"arguments": {}})),
        err("GenericError", "QMP input lacks member 'execute'")
    );
    c.send_raw(b"\xff\xfe\n");
    assert_eq!(c.reply()["error"]["class"], "GenericError");
    assert_eq!(
        c.raw("{\"bad\n"),
        err("GenericError", "Invalid JSON syntax")
    );
    // Framing: no newlines, several messages in one write, one message over several writes.
    c.send_raw(b"{\"execute\":\"query-status\",\"id\":1}{\"execute\":\"query-status\",\"id\":2}");
    assert_eq!(c.reply()["id"], 1);
    assert_eq!(c.reply()["id"], 2);
    c.send_raw(b"{\"execute\":");
    std::thread::sleep(Duration::from_millis(20));
    c.send_raw(b"\"query-status\", \"id\": \"}{\"}");
    assert_eq!(c.reply()["id"], "}{");
    // Still fine.
    assert_eq!(
        c.cmd(json!({"execute": "query-status"}))["return"]["status"],
        "prelaunch"
    );
    server.shutdown();
}

#[test]
fn huge_message_closes_connection_and_next_client_works() {
    let (server, _mock, path) = start("q.sock");
    let mut c = Client::negotiated(&path);
    let mut big = b"{\"execute\": \"query-status\", \"arguments\": {\"x\": \"".to_vec();
    big.resize(MAX_MESSAGE_SIZE + 100, b'a');
    // The server may close while we are still writing.
    let _ = c.w.write_all(&big);
    assert_eq!(
        c.recv(),
        err("GenericError", "JSON token size limit exceeded")
    );
    c.assert_eof();
    let mut c2 = Client::negotiated(&path);
    assert_eq!(
        c2.cmd(json!({"execute": "query-status"}))["return"]["status"],
        "prelaunch"
    );
    server.shutdown();
}

#[test]
fn disconnect_mid_message_and_queued_second_client() {
    let (server, mock, path) = start("q.sock");
    {
        let mut c = Client::negotiated(&path);
        c.send_raw(b"{\"execute\": \"sto");
    } // gone mid-message
    let mut c1 = Client::negotiated(&path);
    // A second client waits (QEMU: one client per chardev) ...
    let mut c2 = Client::connect(&path);
    c2.r.get_ref()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut line = String::new();
    assert!(c2.r.read_line(&mut line).is_err(), "greeted early: {line}");
    assert_eq!(
        c1.cmd(json!({"execute": "query-status"}))["return"]["status"],
        "prelaunch"
    );
    assert!(mock.calls().is_empty(), "{:?}", mock.calls());
    drop(c1);
    // ... and is greeted when the first leaves.
    c2.r.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(c2.recv().get("QMP").is_some());
    assert_eq!(
        c2.cmd(json!({"execute": "qmp_capabilities"})),
        json!({"return": {}})
    );
    assert_eq!(c2.cmd(json!({"execute": "stop"})), json!({"return": {}}));
    c2.event("STOP");
    server.shutdown();
}

#[test]
fn emit_never_blocks_on_a_client_that_does_not_read() {
    let (server, mock, path) = start("q.sock");
    let c = Client::negotiated(&path);
    let sink = mock.sink().clone();
    // 5 MB of events to a client that reads none: far more than the socket buffer and the
    // event queue hold. Emitting must never wait for the client, so this loop ends; the
    // bound below only turns a hang (emit blocked on the socket) into a failure, it measures
    // nothing.
    let pad = "x".repeat(1000);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let spam = sink.clone();
    std::thread::spawn(move || {
        for i in 0..5_000 {
            spam.emit("SPAM", json!({"i": i, "pad": pad}));
        }
        let _ = done_tx.send(());
    });
    assert!(
        done_rx.recv_timeout(Duration::from_secs(120)).is_ok(),
        "emit blocked on a client that does not read"
    );
    drop(c);
    // Without any client, emitting is a no-op.
    for _ in 0..1000 {
        sink.emit("SPAM", Value::Null);
    }
    let mut c2 = Client::negotiated(&path);
    assert_eq!(
        c2.cmd(json!({"execute": "query-status"}))["return"]["status"],
        "prelaunch"
    );
    assert!(c2.events.is_empty());
    server.shutdown();
    EventSink::disconnected().emit("X", Value::Null);
}

#[test]
fn stale_socket_is_replaced_and_other_files_are_not() {
    let path = sock_path("q.sock");
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale);
    assert!(path.exists());
    let mock = Arc::new(Mock::default());
    let (server, sink) = QmpServer::start(&path, mock.clone()).unwrap();
    mock.events.set(sink).unwrap();
    Client::negotiated(&path);
    server.shutdown();
    assert!(!path.exists());

    std::fs::write(&path, b"not a socket").unwrap();
    let e = QmpServer::start(&path, Arc::new(Mock::default())).unwrap_err();
    assert!(e.to_string().contains("Address already in use"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");

    let nowhere = path.with_file_name("no-such-dir").join("q.sock");
    let e = QmpServer::start(&nowhere, Arc::new(Mock::default())).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "Failed to bind socket to {}: No such file or directory",
            nowhere.display()
        )
    );
}

#[test]
fn garbage_never_kills_the_server() {
    let (server, _mock, path) = start("q.sock");
    let inputs: &[&[u8]] = &[
        b"\x00\x01\x02\xff\n",
        b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]\n",
        b"{\"execute\": \"device_add\", \"arguments\": {\"driver\": \"virtio-rng-pci\", \"x\": null}}\n",
        b"{\"execute\": \"human-monitor-command\", \"arguments\": {\"command-line\": \"info pci extra \\u0000\"}}\n",
        b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [1]}}",
        b"\"unterminated",
    ];
    for input in inputs {
        let mut c = Client::greeted(&path);
        c.send_raw(input);
        let _ = c.cmd(json!({"execute": "qmp_capabilities"}));
    }
    let mut c = Client::negotiated(&path);
    assert_eq!(
        c.cmd(json!({"execute": "query-status"}))["return"]["status"],
        "prelaunch"
    );
    server.shutdown();
}

/// The Python helper `tests/qmp_e2e.py` (the `qemu.qmp` library) against the mock machine.
/// Needs python3 with `qemu.qmp` (resources/test.sh installs it); fails loudly without.
#[test]
fn qemu_qmp_library_client() {
    let has_lib = std::process::Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_lib,
        "python3 with the qemu.qmp library is needed: pip install qemu.qmp (resources/test.sh does)"
    );
    let (server, mock, path) = start("q.sock");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/qmp_e2e.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&path)
        .args(["--id", "rng9", "--addr", "06.0", "--hmp", "info status"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["greeting"]["QMP"]["version"]["qemu"]["major"], 7);
    assert_eq!(lines[1]["return"]["status"], "prelaunch");
    assert_eq!(lines[2]["cmd"], "device_add");
    assert_eq!(lines[2]["return"], json!({}));
    assert_eq!(lines[3]["return"][0]["devices"][1]["qdev_id"], "rng0");
    assert_eq!(lines[4]["return"], "VM status: paused (prelaunch)\r\n");
    assert_eq!(lines[5]["cmd"], "cont");
    assert_eq!(lines[6]["event"], "RESUME");
    assert_eq!(lines[7]["return"]["status"], "running");
    assert_eq!(
        mock.added.lock().unwrap()[0],
        parse_device("virtio-rng-pci,id=rng9,addr=06.0").unwrap()
    );
    // A refused device_add is reported, not fatal.
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&path)
        .args(["--driver", "e1000", "--no-cont"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let add: Value = serde_json::from_str(stdout.lines().nth(2).unwrap()).unwrap();
    assert_eq!(
        add["error"],
        json!({"class": "GenericError", "desc": "'e1000' is not a valid device model name"})
    );
    server.shutdown();
}

#[test]
fn hmp_quit_replies_first_and_quit_may_shut_the_server_down() {
    let (server, mock, path) = start("q.sock");
    *mock.server.lock().unwrap() = Some(server);
    let mut c = Client::negotiated(&path);
    c.send_raw(
        b"{\"execute\": \"human-monitor-command\", \"arguments\": {\"command-line\": \"quit\"}}",
    );
    assert_eq!(c.recv(), json!({"return": ""}));
    let e = c.event("SHUTDOWN");
    assert_eq!(e["data"]["reason"], "host-qmp-quit");
    c.assert_eof();
    assert_eq!(mock.calls(), vec!["quit"]);
    let t = Instant::now();
    while path.exists() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!path.exists());
}

/// The thread that runs QMP commands installs its filter before it serves: a command that
/// opens an inet socket is refused there (the vmm's QMP filter with EPERM instead of a kill),
/// while the same command on an unconfined server gets its socket.
#[test]
fn commands_run_on_the_confined_qmp_thread() {
    use seccompiler::SeccompAction;
    use vmm::monitor::{ThreadInit, ThreadSetup};
    let refuse = || SeccompAction::Errno(libc::EPERM as u32);
    let serve = vmm::seccomp::qmp_filter_with(refuse()).unwrap();
    let events = vmm::seccomp::qmp_events_filter_with(refuse()).unwrap();
    let init = |f: vmm::seccomp::Filter| -> ThreadInit {
        Box::new(move || vmm::seccomp::apply(&f).map_err(|e| e.to_string()))
    };
    let path = sock_path("confined");
    let mock = Arc::new(Mock::default());
    let setup = ThreadSetup {
        serve: Some(init(serve)),
        events: Some(init(events)),
    };
    let (server, sink) = QmpServer::start_confined(&path, mock.clone(), setup).unwrap();
    mock.events.set(sink).unwrap();
    let mut c = Client::negotiated(&path);
    let r = c.cmd(json!({"execute": "dump-machine", "arguments": {"path": "probe-seccomp"}}));
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("inet socket: Operation not permitted"),
        "{r}"
    );
    // Events still flow through the confined event thread.
    mock.sink().stop();
    assert_eq!(
        c.cmd(json!({"execute": "query-status"}))["return"]["status"],
        "prelaunch"
    );
    assert!(
        c.events.iter().any(|e| e["event"] == "STOP"),
        "{:?}",
        c.events
    );
    drop(c);
    server.shutdown();

    let (server, mock, path) = start("unconfined");
    let mut c = Client::negotiated(&path);
    let r = c.cmd(json!({"execute": "dump-machine", "arguments": {"path": "probe-seccomp"}}));
    assert_eq!(
        r["return"],
        json!({}),
        "without the filter the socket is made: {r}"
    );
    drop((c, mock));
    server.shutdown();
}
