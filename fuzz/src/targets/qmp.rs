//! QMP: a client's byte stream, framed by the `Streamer`, parsed by `parse_message` and
//! dispatched (HMP included) against a stub machine.

use serde_json::Value;
use vmm::device_config::DeviceSpec;
use vmm::monitor::commands::dispatch;
use vmm::monitor::qmp::{parse_message, Chunk, Streamer};
use vmm::monitor::{CommandError, PciFunctionInfo, PciRegionInfo, RunState, VmControl};

/// Tokens for QMP streams.
pub const QMP_DICT: &[&[u8]] = &[
    b"{\"execute\":\"qmp_capabilities\"}",
    b"{\"execute\":\"query-pci\"}",
    b"{\"execute\":\"query-status\"}",
    b"{\"execute\":\"query-stats\",\"arguments\":{\"target\":\"vcpu\",\"providers\":[{\"provider\":\"kvm\",\"names\":[\"exits\"]}]}}",
    b"{\"execute\":\"human-monitor-command\",\"arguments\":{\"command-line\":\"info stats vm * kvm\"}}",
    b"{\"execute\":\"device_add\",\"arguments\":{\"driver\":\"virtio-rng-pci\",\"id\":\"r\",\"addr\":\"5\"}}",
    b"{\"execute\":\"device_del\",\"arguments\":{\"id\":\"r\"}}",
    b"{\"execute\":\"human-monitor-command\",\"arguments\":{\"command-line\":\"info pci\"}}",
    b"{\"execute\":\"human-monitor-command\",\"arguments\":{\"command-line\":\"info qtree\"}}",
    b"\"execute\"",
    b"\"arguments\"",
    b"\"id\"",
    b"\"command-line\"",
    b"\"help\"",
    b"\"device_add\"",
    b"\"query-commands\"",
    b"\"quit\"",
    b"\"stop\"",
    b"\"cont\"",
    b"\"save-compat\"",
    b"\"dump-machine\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b"\\",
    b"\n",
    b":",
    b",",
    b"null",
    b"1e400",
    b"-0",
    b"\"\\ud800\"",
];

/// Strings for structure-aware mutation of QMP messages.
pub const QMP_STRINGS: &[&str] = &[
    "execute",
    "arguments",
    "id",
    "qmp_capabilities",
    "query-status",
    "query-pci",
    "query-commands",
    "query-version",
    "query-compat",
    "query-machine",
    "device_add",
    "device_del",
    "human-monitor-command",
    "command-line",
    "info pci",
    "info qtree",
    "info status",
    "help",
    "driver",
    "virtio-rng-pci",
    "virtio-blk-pci",
    "addr",
    "05.0",
    "rng0",
    "vectors",
    "enable",
    "oob",
    "cont",
    "stop",
    "system_reset",
    "quit",
    "save-compat",
    "dump-machine",
    "path",
];

/// A machine that accepts everything and has two functions.
pub(crate) struct Stub;

impl VmControl for Stub {
    fn status(&self) -> RunState {
        RunState::Running
    }
    fn cont(&self) -> Result<(), CommandError> {
        Ok(())
    }
    fn stop(&self) -> Result<(), CommandError> {
        Ok(())
    }
    fn system_reset(&self) -> Result<(), CommandError> {
        Ok(())
    }
    fn quit(&self) {}
    fn pci_functions(&self) -> Vec<PciFunctionInfo> {
        vec![
            PciFunctionInfo {
                class: 0x0600,
                vendor: 0x1b36,
                device: 0x0008,
                driver: "gpex-root".into(),
                ..Default::default()
            },
            PciFunctionInfo {
                slot: 5,
                class: 0x00ff,
                vendor: 0x1af4,
                device: 0x1044,
                irq_pin: 1,
                qdev_id: "rng0".into(),
                driver: "virtio-rng-pci".into(),
                regions: vec![PciRegionInfo {
                    bar: 1,
                    address: u64::MAX,
                    size: 0x1000,
                    ..Default::default()
                }],
                props: vec![("vectors".into(), "2".into())],
                ..Default::default()
            },
        ]
    }
    fn device_reports(&self) -> Vec<(pci::PciAddress, String, String)> {
        pci::PciAddress::new(0, 5, 0)
            .map(|a| vec![(a, "rng0".into(), "  status 0x0f (activated)\n".into())])
            .unwrap_or_default()
    }
    fn device_add(&self, args: &serde_json::Map<String, Value>) -> Result<(), CommandError> {
        DeviceSpec::from_qmp(args)
            .map(|_| ())
            .map_err(|e| CommandError::generic(e.to_string()))
    }
    fn device_del(&self, id: &str) -> Result<(), CommandError> {
        if id == "rng0" {
            Ok(())
        } else {
            Err(CommandError::device_not_found(id))
        }
    }
    fn query_compat(&self) -> Result<Value, CommandError> {
        Ok(serde_json::json!({}))
    }
    fn save_compat(&self, _path: &str) -> Result<(), CommandError> {
        Err(CommandError::generic("not in the fuzzer"))
    }
    fn query_machine(&self) -> Result<Value, CommandError> {
        Ok(serde_json::json!({}))
    }
    fn dump_machine(&self, _path: &str) -> Result<(), CommandError> {
        Err(CommandError::generic("not in the fuzzer"))
    }
}

fn check_response(r: &Value, msg: &[u8]) {
    let ctx = || String::from_utf8_lossy(msg).into_owned();
    let obj = r
        .as_object()
        .unwrap_or_else(|| panic!("reply to {:?} is not an object: {r}", ctx()));
    let has_return = obj.contains_key("return");
    let has_error = obj.contains_key("error");
    assert!(
        has_return != has_error,
        "reply to {:?} must have exactly one of return/error: {r}",
        ctx()
    );
    if let Some(e) = obj.get("error") {
        assert!(
            e.get("class").is_some_and(Value::is_string)
                && e.get("desc").is_some_and(Value::is_string),
            "error reply to {:?} lacks class/desc: {r}",
            ctx()
        );
    }
    for k in obj.keys() {
        assert!(
            matches!(k.as_str(), "return" | "error" | "id"),
            "reply to {:?} has key {k}: {r}",
            ctx()
        );
    }
}

/// Target: a QMP byte stream in random chunks.
pub fn target_qmp(data: &[u8]) {
    // A small limit for some inputs (without taking a byte from the stream).
    let max = if data.len() % 7 == 3 { 64 } else { 4096 };
    let mut streamer = Streamer::new(max);
    let stream = data;
    let mut chunks = Vec::new();
    let mut pos = 0;
    let mut cut = 1usize;
    while pos < stream.len() {
        // Deterministic chunking from the data itself.
        cut = (cut * 7 + usize::from(stream[pos])) % 23 + 1;
        let end = (pos + cut).min(stream.len());
        streamer.feed(&stream[pos..end], &mut chunks);
        pos = end;
    }
    let mut negotiated = false;
    let mut total = 0;
    for c in chunks {
        match c {
            Chunk::TooBig => {}
            Chunk::Message(m) => {
                total += m.len();
                assert!(
                    m.len() <= max,
                    "message of {} bytes past the limit {max}",
                    m.len()
                );
                let outcome = dispatch(&Stub, parse_message(&m), negotiated);
                check_response(&outcome.response, &m);
                if outcome.negotiated {
                    negotiated = true;
                }
            }
        }
    }
    assert!(total <= stream.len(), "the streamer made up bytes");
}
