//! What the monitor knows of a machine: the [`VmControl`] trait a machine implements, the
//! neutral data it reports ([`PciFunctionInfo`]), run states and command errors. Nothing here
//! names a device type or the machine: the monitor owns this interface and the machine side
//! (`crate::qmp_control`) implements it.

/// QEMU's run states as far as this monitor reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Created but not started (`-S`): waiting for `cont`.
    Prelaunch,
    /// vCPUs running.
    Running,
    /// Stopped by `stop`.
    Paused,
    /// The guest shut down (or `quit` is under way).
    Shutdown,
}

impl RunState {
    /// QEMU's name (`query-status`'s `status`).
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shutdown",
        }
    }
}

/// The kind of a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RegionKind {
    /// Port I/O.
    Io,
    /// Memory-mapped.
    #[default]
    Memory,
}

/// One implemented BAR (or ROM, bar 6) of a PCI function.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PciRegionInfo {
    /// BAR index (0-5, 6 for the expansion ROM).
    pub bar: u8,
    /// I/O or memory.
    pub kind: RegionKind,
    /// Guest address; `u64::MAX` when not mapped (QEMU reports -1).
    pub address: u64,
    /// Size in bytes (non-zero).
    pub size: u64,
    /// Prefetchable (memory only).
    pub prefetch: bool,
    /// 64-bit BAR (memory only).
    pub mem_type_64: bool,
}

/// What the monitor needs to know of one PCI function (neutral data, no device types).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PciFunctionInfo {
    /// Bus number.
    pub bus: u8,
    /// Slot (device) number.
    pub slot: u8,
    /// Function number.
    pub function: u8,
    /// Class and subclass: config bytes 0x0b..0x0a as one word (e.g. 0x0600 host bridge).
    pub class: u16,
    /// Programming interface.
    pub prog_if: u8,
    /// Revision ID.
    pub revision: u8,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
    /// Interrupt pin (0 none, 1 = INTA# ...).
    pub irq_pin: u8,
    /// Interrupt line register.
    pub irq_line: u8,
    /// qdev id (`id=`, or "" for devices without one, e.g. the host bridge).
    pub qdev_id: String,
    /// Driver (QEMU type) name, e.g. `virtio-rng-pci`, `gpex-root`.
    pub driver: String,
    /// Implemented regions, by BAR index.
    pub regions: Vec<PciRegionInfo>,
    /// Properties shown by `info qtree` (`name = value`, in order; values as they print).
    pub props: Vec<(String, String)>,
    /// For a PCI-to-PCI bridge: its bus numbers and windows as programmed now.
    pub bridge: Option<PciBridgeInfo>,
}

/// A bridge's bus numbers and windows (QEMU's `PciBusInfo`); windows are (base, limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PciBridgeInfo {
    /// The bus the bridge sits on (its primary bus register).
    pub number: u8,
    /// Secondary bus.
    pub secondary: u8,
    /// Subordinate bus.
    pub subordinate: u8,
    /// I/O window.
    pub io_range: (u64, u64),
    /// Memory window.
    pub memory_range: (u64, u64),
    /// Prefetchable memory window.
    pub prefetchable_range: (u64, u64),
}

/// The machine's interrupt wiring as the host has it (for HMP `info gsi`: leak checks and
/// diagnostics).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GsiInfo {
    /// The GSIs allocated to MSI/MSI-X vectors, in order, each with whether it is routed now.
    pub msi: Vec<(u32, bool)>,
    /// Entries in KVM's GSI routing table (the fixed PIC / IO-APIC pins and the MSI routes).
    pub routes: usize,
    /// Level-triggered INTx lines registered (irqfds with resampling).
    pub intx_lines: usize,
}

/// A failed command: QEMU's error class (`GenericError`, `DeviceNotFound`, ...) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    /// QMP error class.
    pub class: String,
    /// Human-readable description (QEMU's text where QEMU has one).
    pub desc: String,
}

impl CommandError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        CommandError {
            class: "GenericError".into(),
            desc: desc.into(),
        }
    }

    /// An error of class `class`.
    pub fn new(class: impl Into<String>, desc: impl Into<String>) -> Self {
        CommandError {
            class: class.into(),
            desc: desc.into(),
        }
    }

    /// QEMU's `DeviceNotFound`: `Device 'ID' not found`.
    pub fn device_not_found(id: &str) -> Self {
        CommandError::new("DeviceNotFound", format!("Device '{id}' not found"))
    }
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for CommandError {}

/// The machine as the monitor drives it. Called from the monitor's thread, one command at a
/// time; implementations must not block for long (state changes are requests: e.g. `quit`
/// asks the machine to stop and returns; the reply is sent before it is called).
pub trait VmControl: Send + Sync {
    /// Current run state.
    fn status(&self) -> RunState;
    /// `cont`: start (from prelaunch) or resume the vCPUs. Emit `RESUME` when they run.
    fn cont(&self) -> Result<(), CommandError>;
    /// `stop`: pause the vCPUs. Emit `STOP` when paused.
    fn stop(&self) -> Result<(), CommandError>;
    /// `system_reset`: reset the machine. Emit `RESET` (`guest: false`, `host-qmp-system-reset`).
    fn system_reset(&self) -> Result<(), CommandError>;
    /// `quit`: end the monitor's VM. Called after the reply has been written. Emit `SHUTDOWN`
    /// (`guest: false`, `reason: host-qmp-quit`), then [`QmpServer::shutdown`](super::QmpServer::shutdown) to flush it.
    fn quit(&self);
    /// All PCI functions, any order (the monitor sorts them by bus, slot and function).
    fn pci_functions(&self) -> Vec<PciFunctionInfo>;
    /// `device_add`: add a device. `args` are the QMP arguments as given (`driver` a string,
    /// the properties JSON values of their type or strings), e.g. `{"driver":
    /// "virtio-rng-pci", "id": "rng1", "addr": "05.0", "vectors": 4}`; the machine parses them
    /// with the `--device` rules and texts.
    fn device_add(
        &self,
        args: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), CommandError>;
    /// `device_del`: remove the device `id` ([`CommandError::device_not_found`] if none).
    /// Emit `DEVICE_DELETED` when it is gone.
    fn device_del(&self, id: &str) -> Result<(), CommandError>;
    /// `query-compat`: the compat record of the running machine (any JSON value).
    fn query_compat(&self) -> Result<serde_json::Value, CommandError>;
    /// `save-compat`: write the compat record to `path`.
    fn save_compat(&self, path: &str) -> Result<(), CommandError>;
    /// `query-machine`: the machine description (any JSON value).
    fn query_machine(&self) -> Result<serde_json::Value, CommandError>;
    /// `dump-machine`: write the machine description to `path`.
    fn dump_machine(&self, path: &str) -> Result<(), CommandError>;
    /// The internal state of each function that reports one (virtio devices: status, MSI-X
    /// vectors, queue rings as they are in guest memory), as (address, qdev id, report text),
    /// for HMP `info virtio`.
    fn device_reports(&self) -> Vec<(pci::PciAddress, String, String)>;
    /// The interrupt wiring (MSI GSIs, KVM routes, INTx lines), for HMP `info gsi`; None
    /// when the machine has none to report (the default).
    fn gsi_info(&self) -> Option<GsiInfo> {
        None
    }
    /// `query-stats` / `info stats`: the statistics of the VM (one source, no QOM path) or of
    /// each vCPU (one source per vCPU, in vCPU order, with its QOM path), provider `kvm`, read
    /// now. The default: none to be had ([`IOCTL_FAILED`], QEMU's text).
    fn stats(&self, target: StatsTarget) -> Result<Vec<StatsSource>, CommandError> {
        let _ = target;
        Err(CommandError::generic(IOCTL_FAILED))
    }
}

/// QEMU's class descriptions (`hw/pci/pci.c`).
pub const PCI_CLASS_DESCRIPTIONS: &[(u16, &str)] = &[
    (0x0001, "VGA controller"),
    (0x0100, "SCSI controller"),
    (0x0101, "IDE controller"),
    (0x0102, "Floppy controller"),
    (0x0103, "IPI controller"),
    (0x0104, "RAID controller"),
    (0x0106, "SATA controller"),
    (0x0107, "SAS controller"),
    (0x0180, "Storage controller"),
    (0x0200, "Ethernet controller"),
    (0x0201, "Token Ring controller"),
    (0x0202, "FDDI controller"),
    (0x0203, "ATM controller"),
    (0x0280, "Network controller"),
    (0x0300, "VGA controller"),
    (0x0301, "XGA controller"),
    (0x0302, "3D controller"),
    (0x0380, "Display controller"),
    (0x0400, "Video controller"),
    (0x0401, "Audio controller"),
    (0x0402, "Phone"),
    (0x0403, "Audio controller"),
    (0x0480, "Multimedia controller"),
    (0x0500, "RAM controller"),
    (0x0501, "Flash controller"),
    (0x0580, "Memory controller"),
    (0x0600, "Host bridge"),
    (0x0601, "ISA bridge"),
    (0x0602, "EISA bridge"),
    (0x0603, "MC bridge"),
    (0x0604, "PCI bridge"),
    (0x0605, "PCMCIA bridge"),
    (0x0606, "NUBUS bridge"),
    (0x0607, "CARDBUS bridge"),
    (0x0608, "RACEWAY bridge"),
    (0x0680, "Bridge"),
    (0x0700, "Serial port"),
    (0x0701, "Parallel port"),
    (0x0800, "Interrupt controller"),
    (0x0801, "DMA controller"),
    (0x0802, "Timer"),
    (0x0803, "RTC"),
    (0x0900, "Keyboard"),
    (0x0901, "Pen"),
    (0x0902, "Mouse"),
    (0x0A00, "Dock station"),
    (0x0B00, "i386 cpu"),
    (0x0c00, "Firewire controller"),
    (0x0c01, "Access bus controller"),
    (0x0c02, "SSA controller"),
    (0x0c03, "USB controller"),
    (0x0c04, "Fibre channel controller"),
    (0x0c05, "SMBus"),
];

/// QEMU's description of a class word, if it has one.
pub fn class_desc(class: u16) -> Option<&'static str> {
    PCI_CLASS_DESCRIPTIONS
        .iter()
        .find(|(c, _)| *c == class)
        .map(|(_, d)| *d)
}

/// Functions sorted by bus, slot, function.
pub fn sorted(functions: &[PciFunctionInfo]) -> Vec<&PciFunctionInfo> {
    let mut v: Vec<&PciFunctionInfo> = functions.iter().collect();
    v.sort_by_key(|f| (f.bus, f.slot, f.function));
    v
}

// ---- Statistics (`query-stats`, QEMU 7.2's qapi/stats.json): what a machine reports. ----

/// What the statistics are about (`StatsTarget`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsTarget {
    /// The whole VM.
    Vm,
    /// Each vCPU.
    Vcpu,
}

impl StatsTarget {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            StatsTarget::Vm => "vm",
            StatsTarget::Vcpu => "vcpu",
        }
    }

    pub(super) fn parse(s: &str) -> Option<StatsTarget> {
        match s {
            "vm" => Some(StatsTarget::Vm),
            "vcpu" => Some(StatsTarget::Vcpu),
            _ => None,
        }
    }
}

/// The only provider (`StatsProvider` in QEMU 7.2).
pub const PROVIDER_KVM: &str = "kvm";

/// `StatsType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatType {
    /// Counts since creation.
    Cumulative,
    /// The value now.
    Instant,
    /// The highest value seen.
    Peak,
    /// Buckets of equal width (`bucket-size`).
    LinearHistogram,
    /// Buckets of power-of-two width.
    Log2Histogram,
}

impl StatType {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            StatType::Cumulative => "cumulative",
            StatType::Instant => "instant",
            StatType::Peak => "peak",
            StatType::LinearHistogram => "linear-histogram",
            StatType::Log2Histogram => "log2-histogram",
        }
    }
}

/// `StatsUnit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatUnit {
    /// Bytes.
    Bytes,
    /// Seconds.
    Seconds,
    /// CPU cycles.
    Cycles,
    /// A yes/no value.
    Boolean,
}

impl StatUnit {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            StatUnit::Bytes => "bytes",
            StatUnit::Seconds => "seconds",
            StatUnit::Cycles => "cycles",
            StatUnit::Boolean => "boolean",
        }
    }
}

/// `StatsSchemaValue`: what one statistic is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatSchema {
    /// Name, e.g. `exits`.
    pub name: String,
    /// Type.
    pub kind: StatType,
    /// Unit, if any.
    pub unit: Option<StatUnit>,
    /// 10 or 2, given only with a non-zero exponent.
    pub base: Option<u8>,
    /// The value is `value * base^exponent` units.
    pub exponent: i16,
    /// Bucket width of a linear histogram.
    pub bucket_size: Option<u32>,
}

/// `StatsValue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatValue {
    /// One number.
    Scalar(u64),
    /// A yes/no value.
    Boolean(bool),
    /// Histogram buckets.
    List(Vec<u64>),
}

/// One statistic with its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// What it is.
    pub schema: StatSchema,
    /// Its value now.
    pub value: StatValue,
}

/// The statistics of the VM (`qom_path` None) or of one vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsSource {
    /// The vCPU's QOM path (`/machine/unattached/device[N]`).
    pub qom_path: Option<String>,
    /// Its statistics, in the provider's order.
    pub stats: Vec<Stat>,
}

/// QEMU's text when the KVM statistics cannot be had.
pub const IOCTL_FAILED: &str = "KVM stats: ioctl failed";
