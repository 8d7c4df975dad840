//! `query-stats`, `query-stats-schemas` (QEMU 7.2's qapi/stats.json, provider `kvm`) and HMP
//! `info stats`.
//!
//! The machine reports its statistics as neutral data ([`StatsSource`]: the VM, or one vCPU
//! with its QOM path) through [`VmControl::stats`]; this module applies QEMU's filters and
//! builds QEMU's replies. QEMU builds its lists by prepending (`QAPI_LIST_PREPEND`), so its
//! replies list vCPUs, statistics and histogram buckets in reverse order; so do ours, so that a
//! client sees the same JSON from both.

use std::fmt::Write;

use serde_json::{json, Map, Value};

use super::control::{CommandError, VmControl};
pub use super::control::{
    Stat, StatSchema, StatType, StatUnit, StatValue, StatsSource, StatsTarget, IOCTL_FAILED,
    PROVIDER_KVM,
};

/// One `StatsRequest`: the provider's statistics, all or only `names`.
struct Request {
    names: Option<Vec<String>>,
}

/// A checked `StatsFilter`.
struct Filter {
    target: StatsTarget,
    /// None: every provider, every name.
    providers: Option<Vec<Request>>,
    /// vCPU QOM paths (target vcpu only).
    vcpus: Option<Vec<String>>,
}

fn missing(name: &str) -> CommandError {
    CommandError::generic(format!("Parameter '{name}' is missing"))
}

fn bad_type(name: &str, ty: &str) -> CommandError {
    CommandError::generic(format!(
        "Invalid parameter type for '{name}', expected: {ty}"
    ))
}

fn bad_value(name: &str, v: &str) -> CommandError {
    CommandError::generic(format!("Parameter '{name}' does not accept value '{v}'"))
}

fn unexpected(m: &Map<String, Value>, prefix: &str, known: &[&str]) -> Result<(), CommandError> {
    match m.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(CommandError::generic(format!(
            "Parameter '{prefix}{k}' is unexpected"
        ))),
        None => Ok(()),
    }
}

fn str_list(v: &Value, name: &str) -> Result<Vec<String>, CommandError> {
    let Value::Array(a) = v else {
        return Err(bad_type(name, "array"));
    };
    a.iter()
        .enumerate()
        .map(|(i, s)| {
            s.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad_type(&format!("{name}[{i}]"), "string"))
        })
        .collect()
}

fn provider(v: Option<&Value>, name: &str) -> Result<(), CommandError> {
    match v {
        None => Err(missing(name)),
        Some(Value::String(s)) if s == PROVIDER_KVM => Ok(()),
        Some(Value::String(s)) => Err(bad_value(name, s)),
        Some(_) => Err(bad_type(name, "string")),
    }
}

/// Checks `query-stats` arguments as QEMU's input visitor does: the base members in order,
/// then the union branch's, then anything unexpected.
fn parse_filter(args: &Map<String, Value>) -> Result<Filter, CommandError> {
    let target = match args.get("target") {
        None => return Err(missing("target")),
        Some(Value::String(s)) => StatsTarget::parse(s).ok_or_else(|| bad_value("target", s))?,
        Some(_) => return Err(bad_type("target", "string")),
    };
    let providers = match args.get("providers") {
        None => None,
        Some(Value::Array(list)) => {
            let mut out = Vec::new();
            for (i, r) in list.iter().enumerate() {
                let name = format!("providers[{i}]");
                let Value::Object(m) = r else {
                    return Err(bad_type(&name, "object"));
                };
                provider(m.get("provider"), &format!("{name}.provider"))?;
                let names = m
                    .get("names")
                    .map(|v| str_list(v, &format!("{name}.names")))
                    .transpose()?;
                unexpected(m, &format!("{name}."), &["provider", "names"])?;
                out.push(Request { names });
            }
            Some(out)
        }
        Some(_) => return Err(bad_type("providers", "array")),
    };
    let mut known = vec!["target", "providers"];
    let vcpus = match target {
        StatsTarget::Vcpu => {
            known.push("vcpus");
            args.get("vcpus")
                .map(|v| str_list(v, "vcpus"))
                .transpose()?
        }
        StatsTarget::Vm => None,
    };
    unexpected(args, "", &known)?;
    Ok(Filter {
        target,
        providers,
        vcpus,
    })
}

fn value_json(v: &StatValue) -> Value {
    match v {
        StatValue::Scalar(n) => json!(n),
        StatValue::Boolean(b) => json!(b),
        // QEMU prepends each bucket.
        StatValue::List(l) => Value::Array(l.iter().rev().map(|n| json!(n)).collect()),
    }
}

/// Applies `filter` to what the machine reports: `StatsResult`s, in QEMU's order.
fn filtered(backend: &dyn VmControl, filter: &Filter) -> Result<Vec<StatsSource>, CommandError> {
    let requests: Vec<Option<&Request>> = match &filter.providers {
        None => vec![None],
        Some(r) => r.iter().map(Some).collect(),
    };
    let mut results: Vec<StatsSource> = Vec::new();
    for request in requests {
        let names = request.and_then(|r| r.names.as_ref());
        // An empty list of names or of vCPUs asks for nothing.
        if names.is_some_and(|n| n.is_empty()) || filter.vcpus.as_ref().is_some_and(Vec::is_empty) {
            continue;
        }
        for source in backend.stats(filter.target)? {
            if let (Some(want), Some(path)) = (&filter.vcpus, &source.qom_path) {
                if !want.contains(path) {
                    continue;
                }
            }
            let stats: Vec<Stat> = source
                .stats
                .into_iter()
                .filter(|s| names.is_none_or(|n| n.contains(&s.schema.name)))
                .rev()
                .collect();
            if !stats.is_empty() {
                results.push(StatsSource {
                    qom_path: source.qom_path,
                    stats,
                });
            }
        }
    }
    results.reverse();
    Ok(results)
}

/// `query-stats`.
pub fn query_stats(
    backend: &dyn VmControl,
    args: &Map<String, Value>,
) -> Result<Value, CommandError> {
    let filter = parse_filter(args)?;
    let results = filtered(backend, &filter)?;
    Ok(Value::Array(
        results
            .into_iter()
            .map(|StatsSource { qom_path, stats }| {
                let mut r = Map::new();
                r.insert("provider".into(), json!(PROVIDER_KVM));
                if let Some(p) = qom_path {
                    r.insert("qom-path".into(), json!(p));
                }
                r.insert(
                    "stats".into(),
                    Value::Array(
                        stats
                            .iter()
                            .map(|s| json!({"name": s.schema.name, "value": value_json(&s.value)}))
                            .collect(),
                    ),
                );
                Value::Object(r)
            })
            .collect(),
    ))
}

fn schema_json(s: &StatSchema) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), json!(s.name));
    m.insert("type".into(), json!(s.kind.as_str()));
    if let Some(u) = s.unit {
        m.insert("unit".into(), json!(u.as_str()));
    }
    if let Some(b) = s.base {
        m.insert("base".into(), json!(b));
    }
    m.insert("exponent".into(), json!(s.exponent));
    if let Some(b) = s.bucket_size {
        m.insert("bucket-size".into(), json!(b));
    }
    Value::Object(m)
}

/// The schemas as QEMU lists them: the vCPU one (of the first vCPU), then the VM one, each in
/// reverse order.
fn schemas(backend: &dyn VmControl) -> Result<Vec<(StatsTarget, Vec<StatSchema>)>, CommandError> {
    let mut out = Vec::new();
    for target in [StatsTarget::Vm, StatsTarget::Vcpu] {
        let first = backend.stats(target)?.into_iter().next();
        let list = first
            .map(|s| s.stats.into_iter().rev().map(|s| s.schema).collect())
            .unwrap_or_default();
        out.push((target, list));
    }
    out.reverse();
    Ok(out)
}

/// `query-stats-schemas`.
pub fn query_stats_schemas(
    backend: &dyn VmControl,
    args: &Map<String, Value>,
) -> Result<Value, CommandError> {
    if args.contains_key("provider") {
        provider(args.get("provider"), "provider")?;
    }
    unexpected(args, "", &["provider"])?;
    Ok(Value::Array(
        schemas(backend)?
            .into_iter()
            .map(|(target, list)| {
                json!({
                    "provider": PROVIDER_KVM,
                    "target": target.as_str(),
                    "stats": list.iter().map(schema_json).collect::<Vec<_>>(),
                })
            })
            .collect(),
    ))
}

/// QEMU's `si_prefix` (exponents of 10, multiples of 3 from -18 to 18).
fn si_prefix(exp10: i16) -> &'static str {
    const P: [&str; 13] = [
        "a", "f", "p", "n", "u", "m", "", "K", "M", "G", "T", "P", "E",
    ];
    P[((exp10 + 18) / 3) as usize]
}

/// QEMU's `iec_binary_prefix` (exponents of 2, multiples of 10 from 0 to 60).
fn iec_binary_prefix(exp2: i16) -> &'static str {
    const P: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    P[(exp2 / 10) as usize]
}

/// QEMU's `print_stats_schema_value`: `    NAME (TYPE[, UNIT][, bucket size=N])`.
fn schema_text(s: &StatSchema) -> String {
    let mut out = format!(
        "    {} ({}{}",
        s.name,
        s.kind.as_str(),
        if s.unit.is_some() || s.exponent != 0 {
            ", "
        } else {
            ""
        }
    );
    let mut unit = match s.unit {
        Some(StatUnit::Seconds) => Some("s"),
        Some(StatUnit::Bytes) => Some("B"),
        _ => None,
    };
    let base = s.base.unwrap_or(0);
    let e = s.exponent;
    if unit.is_some() && base == 10 && (-18..=18).contains(&e) && e % 3 == 0 {
        out += si_prefix(e);
    } else if unit.is_some() && base == 2 && (0..=60).contains(&e) && e % 10 == 0 {
        out += iec_binary_prefix(e);
    } else if e != 0 {
        let _ = write!(
            out,
            "* {base}^{e}{}",
            if s.unit.is_some() { " " } else { "" }
        );
        unit = None;
    }
    if let Some(u) = s.unit {
        out += unit.unwrap_or(u.as_str());
    }
    if let (StatType::LinearHistogram, Some(b)) = (s.kind, s.bucket_size) {
        let _ = write!(out, ", bucket size={}", b as i32);
    }
    out.push(')');
    out
}

/// QEMU's QOM path of vCPU `index` (x86 CPUs are the first unattached devices).
pub fn vcpu_qom_path(index: u32) -> String {
    format!("/machine/unattached/device[{index}]")
}

/// HMP `info stats TARGET [NAMES] [PROVIDER]` (`\n` line ends): the statistics of the VM, or
/// of the monitor's current vCPU (vCPU 0), one per line with its type and unit, as QEMU prints
/// them. `NAMES` is a comma-separated list, or `*` for all.
pub fn info_stats(backend: &dyn VmControl, args: &[&str]) -> String {
    let Some(&target_str) = args.first() else {
        return "stats: string expected\n".into();
    };
    if args.len() > 3 {
        return "stats: extraneous characters at the end of line\n".into();
    }
    let names = args.get(1).copied();
    let provider = args.get(2).copied();
    let Some(target) = StatsTarget::parse(target_str) else {
        return format!("invalid stats target {target_str}\n");
    };
    if let Some(p) = provider {
        if p != PROVIDER_KVM {
            return format!("invalid stats provider {p}\n");
        }
    }
    let schema = match schemas(backend) {
        Ok(s) => s,
        Err(e) => return format!("{}\n", e.desc),
    };
    let providers = (names.is_some() || provider.is_some()).then(|| {
        vec![Request {
            names: names
                .filter(|n| *n != "*")
                .map(|n| n.split(',').map(str::to_string).collect()),
        }]
    });
    let filter = Filter {
        target,
        providers,
        vcpus: (target == StatsTarget::Vcpu).then(|| vec![vcpu_qom_path(0)]),
    };
    let results = match filtered(backend, &filter) {
        Ok(r) => r,
        Err(e) => return format!("{}\n", e.desc),
    };
    let Some((_, schema_list)) = schema.iter().find(|(t, _)| *t == target) else {
        return format!("failed to find schema list for {PROVIDER_KVM}\n");
    };
    let mut out = String::new();
    for StatsSource { stats, .. } in results {
        if provider.is_none() {
            let _ = writeln!(out, "provider: {PROVIDER_KVM}");
        }
        // QEMU walks the schema list alongside the statistics.
        let mut i = 0;
        for s in &stats {
            while schema_list.get(i).is_some_and(|x| x.name != s.schema.name) {
                i += 1;
            }
            let Some(sch) = schema_list.get(i) else {
                let _ = writeln!(out, "failed to find schema entry for {}", s.schema.name);
                return out;
            };
            out += &schema_text(sch);
            match &s.value {
                StatValue::Scalar(n) => {
                    let _ = writeln!(out, ": {}", *n as i64);
                }
                StatValue::Boolean(b) => {
                    let _ = writeln!(out, ": {}", if *b { "yes" } else { "no" });
                }
                StatValue::List(l) => {
                    out += ": ";
                    for (k, n) in l.iter().rev().enumerate() {
                        let _ = write!(out, "[{}]={} ", k + 1, *n as i64);
                    }
                    out.push('\n');
                }
            }
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::control::{PciFunctionInfo, RunState};

    fn stat(name: &str, kind: StatType, unit: Option<StatUnit>, exp: i16, v: StatValue) -> Stat {
        Stat {
            schema: StatSchema {
                name: name.into(),
                kind,
                unit,
                base: (exp != 0).then_some(10),
                exponent: exp,
                bucket_size: None,
            },
            value: v,
        }
    }

    struct Machine;

    fn vcpu(i: u32, exits: u64) -> StatsSource {
        StatsSource {
            qom_path: Some(vcpu_qom_path(i)),
            stats: vec![
                stat(
                    "exits",
                    StatType::Cumulative,
                    None,
                    0,
                    StatValue::Scalar(exits),
                ),
                stat(
                    "halt_wait_ns",
                    StatType::Cumulative,
                    Some(StatUnit::Seconds),
                    -9,
                    StatValue::Scalar(5),
                ),
                stat(
                    "blocking",
                    StatType::Instant,
                    Some(StatUnit::Boolean),
                    0,
                    StatValue::Boolean(false),
                ),
                stat(
                    "hist",
                    StatType::Log2Histogram,
                    None,
                    0,
                    StatValue::List(vec![1, 2, 3]),
                ),
            ],
        }
    }

    impl VmControl for Machine {
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
            Vec::new()
        }
        fn device_add(&self, _: &Map<String, Value>) -> Result<(), CommandError> {
            Ok(())
        }
        fn device_del(&self, _: &str) -> Result<(), CommandError> {
            Ok(())
        }
        fn query_compat(&self) -> Result<Value, CommandError> {
            Ok(Value::Null)
        }
        fn save_compat(&self, _: &str) -> Result<(), CommandError> {
            Ok(())
        }
        fn query_machine(&self) -> Result<Value, CommandError> {
            Ok(Value::Null)
        }
        fn dump_machine(&self, _: &str) -> Result<(), CommandError> {
            Ok(())
        }
        fn device_reports(&self) -> Vec<(pci::PciAddress, String, String)> {
            Vec::new()
        }
        fn stats(&self, target: StatsTarget) -> Result<Vec<StatsSource>, CommandError> {
            Ok(match target {
                StatsTarget::Vm => vec![StatsSource {
                    qom_path: None,
                    stats: vec![stat(
                        "remote_tlb_flush",
                        StatType::Cumulative,
                        None,
                        0,
                        StatValue::Scalar(7),
                    )],
                }],
                StatsTarget::Vcpu => vec![vcpu(0, 100), vcpu(1, 200)],
            })
        }
    }

    fn q(args: Value) -> Result<Value, CommandError> {
        query_stats(&Machine, args.as_object().unwrap())
    }

    #[test]
    fn query_stats_in_qemus_shape_and_order() {
        assert_eq!(
            q(json!({"target": "vm"})).unwrap(),
            json!([{"provider": "kvm", "stats": [{"name": "remote_tlb_flush", "value": 7}]}])
        );
        let all = q(json!({"target": "vcpu"})).unwrap();
        // vCPUs, statistics and buckets in reverse, as QEMU prepends them.
        assert_eq!(all[0]["qom-path"], "/machine/unattached/device[1]");
        assert_eq!(all[1]["qom-path"], "/machine/unattached/device[0]");
        assert_eq!(
            all[1]["stats"],
            json!([
                {"name": "hist", "value": [3, 2, 1]},
                {"name": "blocking", "value": false},
                {"name": "halt_wait_ns", "value": 5},
                {"name": "exits", "value": 100},
            ])
        );
        let one = q(
            json!({"target": "vcpu", "vcpus": ["/machine/unattached/device[1]"],
            "providers": [{"provider": "kvm", "names": ["exits"]}]}),
        )
        .unwrap();
        assert_eq!(
            one,
            json!([{"provider": "kvm", "qom-path": "/machine/unattached/device[1]",
                "stats": [{"name": "exits", "value": 200}]}])
        );
        assert_eq!(
            q(json!({"target": "vcpu", "vcpus": []})).unwrap(),
            json!([])
        );
        assert_eq!(
            q(json!({"target": "vm", "providers": [{"provider": "kvm", "names": ["nope"]}]}))
                .unwrap(),
            json!([])
        );
    }

    #[test]
    fn query_stats_argument_errors_are_qemus() {
        let err = |a: Value| q(a).unwrap_err().desc;
        assert_eq!(err(json!({})), "Parameter 'target' is missing");
        assert_eq!(
            err(json!({"target": "cpu"})),
            "Parameter 'target' does not accept value 'cpu'"
        );
        assert_eq!(
            err(json!({"target": 1})),
            "Invalid parameter type for 'target', expected: string"
        );
        assert_eq!(
            err(json!({"target": "vm", "vcpus": []})),
            "Parameter 'vcpus' is unexpected"
        );
        assert_eq!(
            err(json!({"target": "vm", "providers": [{"provider": "xen"}]})),
            "Parameter 'providers[0].provider' does not accept value 'xen'"
        );
        assert_eq!(
            err(json!({"target": "vm", "providers": [{}]})),
            "Parameter 'providers[0].provider' is missing"
        );
        assert_eq!(
            err(json!({"target": "vcpu", "vcpus": [1]})),
            "Invalid parameter type for 'vcpus[0]', expected: string"
        );
        assert_eq!(
            err(json!({"target": "vm", "providers": [{"provider": "kvm", "x": 1}]})),
            "Parameter 'providers[0].x' is unexpected"
        );
    }

    #[test]
    fn schemas_vcpu_first_reversed() {
        let s = query_stats_schemas(&Machine, &Map::new()).unwrap();
        assert_eq!(s[0]["target"], "vcpu");
        assert_eq!(s[1]["target"], "vm");
        assert_eq!(
            s[0]["stats"][2],
            json!({"name": "halt_wait_ns", "type": "cumulative", "unit": "seconds", "base": 10, "exponent": -9})
        );
        assert_eq!(
            s[0]["stats"][3],
            json!({"name": "exits", "type": "cumulative", "exponent": 0})
        );
    }

    #[test]
    fn info_stats_text() {
        assert_eq!(
            info_stats(&Machine, &["vcpu"]),
            "provider: kvm\n    hist (log2-histogram): [1]=3 [2]=2 [3]=1 \n    blocking (instant, boolean): no\n    halt_wait_ns (cumulative, ns): 5\n    exits (cumulative): 100\n"
        );
        assert_eq!(
            info_stats(&Machine, &["vcpu", "exits,halt_wait_ns", "kvm"]),
            "    halt_wait_ns (cumulative, ns): 5\n    exits (cumulative): 100\n"
        );
        assert_eq!(
            info_stats(&Machine, &["vm", "*"]),
            "provider: kvm\n    remote_tlb_flush (cumulative): 7\n"
        );
        assert_eq!(info_stats(&Machine, &["cpu"]), "invalid stats target cpu\n");
        assert_eq!(
            info_stats(&Machine, &["vm", "*", "xen"]),
            "invalid stats provider xen\n"
        );
        assert_eq!(info_stats(&Machine, &[]), "stats: string expected\n");
    }

    #[test]
    fn schema_text_units() {
        let mut s = stat(
            "b",
            StatType::Peak,
            Some(StatUnit::Bytes),
            10,
            StatValue::Scalar(0),
        )
        .schema;
        s.base = Some(2);
        assert_eq!(schema_text(&s), "    b (peak, KiB)");
        s.exponent = 3;
        assert_eq!(schema_text(&s), "    b (peak, * 2^3 bytes)");
        s.kind = StatType::LinearHistogram;
        s.unit = None;
        s.exponent = 0;
        s.base = None;
        s.bucket_size = Some(4);
        assert_eq!(schema_text(&s), "    b (linear-histogram, bucket size=4)");
    }
}
