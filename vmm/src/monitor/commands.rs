//! QMP request checking and command dispatch, with QEMU's error classes and texts.

use serde_json::{json, Map, Value};

use super::control::{class_desc, sorted};
use super::control::{CommandError, PciFunctionInfo, RegionKind, VmControl};
use super::hmp;

/// Commands available after negotiation, in `query-commands` order.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-status",
    "cont",
    "stop",
    "system_reset",
    "quit",
    "query-pci",
    "device_add",
    "device_del",
    "query-compat",
    "save-compat",
    "query-machine",
    "dump-machine",
    "query-stats",
    "query-stats-schemas",
    "human-monitor-command",
    "query-version",
    "query-commands",
];

/// The result of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The reply (`{"return": ...}` or `{"error": ...}`, with `id` when given).
    pub response: Value,
    /// Capabilities negotiation just completed.
    pub negotiated: bool,
    /// `quit` succeeded: call [`VmControl::quit`] once the reply is written.
    pub quit: bool,
}

/// The greeting sent on connection.
pub fn greeting() -> Value {
    json!({
        "QMP": {
            "version": {
                "qemu": {"micro": 0, "minor": 2, "major": 7},
                "package": concat!("vmm-", env!("CARGO_PKG_VERSION")),
            },
            "capabilities": [],
        }
    })
}

/// `{"error": {"class", "desc"}}`, with `id` if given.
pub fn error_response(e: &CommandError, id: Option<&Value>) -> Value {
    let mut r = Map::new();
    r.insert("error".into(), json!({"class": e.class, "desc": e.desc}));
    if let Some(id) = id {
        r.insert("id".into(), id.clone());
    }
    Value::Object(r)
}

fn return_response(v: Value, id: Option<&Value>) -> Value {
    let mut r = Map::new();
    r.insert("return".into(), v);
    if let Some(id) = id {
        r.insert("id".into(), id.clone());
    }
    Value::Object(r)
}

fn command_not_found(desc: impl Into<String>) -> CommandError {
    CommandError::new("CommandNotFound", desc)
}

/// Checks the request's shape (QEMU's `qmp_dispatch_check_obj`), returns the command name and
/// its arguments.
fn check_request(req: &Map<String, Value>) -> Result<(&str, Map<String, Value>), CommandError> {
    let mut exec = None;
    let mut args = Map::new();
    for (k, v) in req {
        match k.as_str() {
            "execute" => match v {
                Value::String(s) => exec = Some(s.as_str()),
                _ => {
                    return Err(CommandError::generic(
                        "QMP input member 'execute' must be a string",
                    ))
                }
            },
            "arguments" => match v {
                Value::Object(m) => args = m.clone(),
                _ => {
                    return Err(CommandError::generic(
                        "QMP input member 'arguments' must be an object",
                    ))
                }
            },
            "id" => {}
            _ => {
                return Err(CommandError::generic(format!(
                    "QMP input member '{k}' is unexpected"
                )))
            }
        }
    }
    let exec = exec.ok_or_else(|| CommandError::generic("QMP input lacks member 'execute'"))?;
    Ok((exec, args))
}

/// Argument types, named as QEMU's input visitor names them in errors.
#[derive(Clone, Copy)]
enum Ty {
    Str,
    Int,
    List,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Str => "string",
            Ty::Int => "integer",
            Ty::List => "array",
        }
    }

    fn matches(self, v: &Value) -> bool {
        match self {
            Ty::Str => v.is_string(),
            Ty::Int => v.is_i64() || v.is_u64(),
            Ty::List => v.is_array(),
        }
    }
}

/// Checks `args` against `(name, type, required)` members in schema order, then rejects
/// members the schema does not have (QEMU's order and texts).
fn check_args(args: &Map<String, Value>, schema: &[(&str, Ty, bool)]) -> Result<(), CommandError> {
    for &(name, ty, required) in schema {
        match args.get(name) {
            None if required => {
                return Err(CommandError::generic(format!(
                    "Parameter '{name}' is missing"
                )))
            }
            None => {}
            Some(v) if !ty.matches(v) => {
                return Err(CommandError::generic(format!(
                    "Invalid parameter type for '{name}', expected: {}",
                    ty.name()
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(k) = args
        .keys()
        .find(|k| !schema.iter().any(|s| s.0 == k.as_str()))
    {
        return Err(CommandError::generic(format!(
            "Parameter '{k}' is unexpected"
        )));
    }
    Ok(())
}

fn str_arg<'a>(args: &'a Map<String, Value>, name: &str) -> &'a str {
    args.get(name).and_then(Value::as_str).unwrap_or_default()
}

/// Handles one parsed request (or the parse error) for a client that has (`negotiated`) or
/// has not yet completed capabilities negotiation.
pub fn dispatch(
    backend: &dyn VmControl,
    request: Result<Value, CommandError>,
    negotiated: bool,
) -> Outcome {
    let mut out = Outcome {
        response: Value::Null,
        negotiated: false,
        quit: false,
    };
    let req = match request {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            out.response = error_response(
                &CommandError::generic("QMP input must be a JSON object"),
                None,
            );
            return out;
        }
        Err(e) => {
            out.response = error_response(&e, None);
            return out;
        }
    };
    let id = req.get("id");
    let result = check_request(&req).and_then(|(name, args)| {
        if !negotiated {
            if name == "qmp_capabilities" {
                check_capabilities(&args)?;
                out.negotiated = true;
                return Ok(json!({}));
            }
            return Err(command_not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        run(backend, name, &args, &mut out.quit)
    });
    out.response = match result {
        Ok(v) => return_response(v, id),
        Err(e) => error_response(&e, id),
    };
    out
}

fn check_capabilities(args: &Map<String, Value>) -> Result<(), CommandError> {
    check_args(args, &[("enable", Ty::List, false)])?;
    if let Some(Value::Array(caps)) = args.get("enable") {
        // The first entry decides: none is available.
        if let Some(c) = caps.first() {
            let i = 0;
            match c.as_str() {
                Some("oob") => return Err(CommandError::generic("Capability 'oob' not available")),
                Some(other) => {
                    return Err(CommandError::generic(format!(
                        "Parameter 'enable[{i}]' does not accept value '{other}'"
                    )))
                }
                None => {
                    return Err(CommandError::generic(format!(
                        "Invalid parameter type for 'enable[{i}]', expected: string"
                    )))
                }
            }
        }
    }
    Ok(())
}

fn run(
    backend: &dyn VmControl,
    name: &str,
    args: &Map<String, Value>,
    quit: &mut bool,
) -> Result<Value, CommandError> {
    let none: &[(&str, Ty, bool)] = &[];
    let path = &[("path", Ty::Str, true)];
    match name {
        "qmp_capabilities" => {
            check_capabilities(args)?;
            Err(command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ))
        }
        "query-status" => {
            check_args(args, none)?;
            let s = backend.status();
            Ok(json!({
                "running": s == super::RunState::Running,
                "singlestep": false,
                "status": s.as_str(),
            }))
        }
        "cont" => {
            check_args(args, none)?;
            backend.cont().map(|_| json!({}))
        }
        "stop" => {
            check_args(args, none)?;
            backend.stop().map(|_| json!({}))
        }
        "system_reset" => {
            check_args(args, none)?;
            backend.system_reset().map(|_| json!({}))
        }
        "quit" => {
            check_args(args, none)?;
            *quit = true;
            Ok(json!({}))
        }
        "query-pci" => {
            check_args(args, none)?;
            Ok(query_pci(&backend.pci_functions()))
        }
        "device_add" => device_add(backend, args).map(|_| json!({})),
        "device_del" => {
            check_args(args, &[("id", Ty::Str, true)])?;
            backend.device_del(str_arg(args, "id")).map(|_| json!({}))
        }
        "query-compat" => {
            check_args(args, none)?;
            backend.query_compat()
        }
        "save-compat" => {
            check_args(args, path)?;
            backend
                .save_compat(str_arg(args, "path"))
                .map(|_| json!({}))
        }
        "query-machine" => {
            check_args(args, none)?;
            backend.query_machine()
        }
        "dump-machine" => {
            check_args(args, path)?;
            backend
                .dump_machine(str_arg(args, "path"))
                .map(|_| json!({}))
        }
        "query-stats" => super::stats::query_stats(backend, args),
        "query-stats-schemas" => super::stats::query_stats_schemas(backend, args),
        "human-monitor-command" => {
            check_args(
                args,
                &[
                    ("command-line", Ty::Str, true),
                    ("cpu-index", Ty::Int, false),
                ],
            )?;
            Ok(Value::String(hmp::run(
                backend,
                str_arg(args, "command-line"),
                quit,
            )))
        }
        "query-version" => {
            check_args(args, none)?;
            Ok(greeting()["QMP"]["version"].clone())
        }
        "query-commands" => {
            check_args(args, none)?;
            Ok(Value::Array(
                COMMANDS.iter().map(|c| json!({"name": c})).collect(),
            ))
        }
        _ => Err(command_not_found(format!(
            "The command {name} has not been found"
        ))),
    }
}

/// `device_add`: `driver` (string, required), `id` and `bus` (strings), any other property
/// as a JSON value (its own type, or a string); the backend parses them
/// ([`crate::device_config::DeviceSpec::from_qmp`]).
fn device_add(backend: &dyn VmControl, args: &Map<String, Value>) -> Result<(), CommandError> {
    match args.get("driver") {
        None => return Err(CommandError::generic("Parameter 'driver' is missing")),
        Some(Value::String(_)) => {}
        Some(_) => {
            return Err(CommandError::generic(
                "Invalid parameter type for 'driver', expected: string",
            ))
        }
    }
    for k in ["id", "bus"] {
        if args.get(k).is_some_and(|v| !v.is_string()) {
            return Err(CommandError::generic(format!(
                "Invalid parameter type for '{k}', expected: string"
            )));
        }
    }
    backend.device_add(args)
}

/// One `PciDeviceInfo` (qapi/pci.json).
pub fn pci_device_info(f: &PciFunctionInfo) -> Value {
    let mut class_info = Map::new();
    if let Some(d) = class_desc(f.class) {
        class_info.insert("desc".into(), Value::String(d.into()));
    }
    class_info.insert("class".into(), json!(f.class));
    let regions: Vec<Value> = f
        .regions
        .iter()
        .map(|r| {
            let mut m = Map::new();
            m.insert("bar".into(), json!(r.bar));
            m.insert(
                "type".into(),
                json!(match r.kind {
                    RegionKind::Io => "io",
                    RegionKind::Memory => "memory",
                }),
            );
            m.insert("address".into(), json!(r.address as i64));
            m.insert("size".into(), json!(r.size as i64));
            if r.kind == RegionKind::Memory {
                m.insert("prefetch".into(), json!(r.prefetch));
                m.insert("mem_type_64".into(), json!(r.mem_type_64));
            }
            Value::Object(m)
        })
        .collect();
    let mut d = Map::new();
    d.insert("bus".into(), json!(f.bus));
    d.insert("slot".into(), json!(f.slot));
    d.insert("function".into(), json!(f.function));
    d.insert("class_info".into(), Value::Object(class_info));
    // As QEMU: subsystem IDs only for type-0 headers.
    let id = match f.bridge {
        None => json!({
            "device": f.device,
            "vendor": f.vendor,
            "subsystem": f.subsystem,
            "subsystem-vendor": f.subsystem_vendor,
        }),
        Some(_) => json!({"device": f.device, "vendor": f.vendor}),
    };
    d.insert("id".into(), id);
    if f.irq_pin != 0 {
        d.insert("irq".into(), json!(f.irq_line));
    }
    d.insert("irq_pin".into(), json!(f.irq_pin));
    d.insert("qdev_id".into(), json!(f.qdev_id));
    d.insert("regions".into(), Value::Array(regions));
    Value::Object(d)
}

/// The `PciDeviceInfo`s of bus `bus` in devfn order, each bridge with its `pci_bridge`
/// object: its `PciBusInfo` (bus numbers, windows as `{base, limit}`) and the devices of its
/// secondary bus, as QEMU nests them.
fn bus_devices(functions: &[PciFunctionInfo], bus: u8) -> Vec<Value> {
    sorted(functions)
        .into_iter()
        .filter(|f| f.bus == bus)
        .map(|f| {
            let mut v = pci_device_info(f);
            if let (Some(b), Value::Object(m)) = (f.bridge, &mut v) {
                let range = |(base, limit): (u64, u64)| json!({"base": base, "limit": limit});
                let mut info = Map::new();
                info.insert(
                    "bus".into(),
                    json!({
                        "number": b.number,
                        "secondary": b.secondary,
                        "subordinate": b.subordinate,
                        "io_range": range(b.io_range),
                        "memory_range": range(b.memory_range),
                        "prefetchable_range": range(b.prefetchable_range),
                    }),
                );
                // Only buses above the bridge's own: a guest's numbering cannot loop us.
                if b.secondary > bus {
                    info.insert(
                        "devices".into(),
                        Value::Array(bus_devices(functions, b.secondary)),
                    );
                }
                m.insert("pci_bridge".into(), Value::Object(info));
            }
            v
        })
        .collect()
}

/// `query-pci`: the root bus (`PciInfo` of bus 0), devices in devfn order, each bridge with
/// the devices behind it nested in its `pci_bridge` object (as QEMU).
pub fn query_pci(functions: &[PciFunctionInfo]) -> Value {
    json!([{"bus": 0, "devices": bus_devices(functions, 0)}])
}
