//! `vmm run`: the entry. Builds the [`Machine`], wires the QMP monitor, the stop signals and
//! the console to it, runs the guest and returns the exit status.

use std::io::Write;
use std::sync::Arc;

use crate::cli::RunArgs;
use crate::console::console_loop;
use crate::machine::Machine;
use crate::monitor::{parse_qmp_option, QmpServer, ThreadInit, ThreadSetup};
use crate::qmp_control::MachineControl;
use crate::seccomp;
use crate::signals::{block_stop_signals, handle_stop_signals};
use crate::stop::StopReason;
use crate::vcpu::install_kick_handler;
use crate::Error;

/// Boots the guest described by `args` and runs it to the end. Returns the exit status.
pub fn run(args: &RunArgs) -> Result<i32, Error> {
    let qmp_path = match &args.qmp {
        Some(o) => Some(parse_qmp_option(o).map_err(Error::Config)?),
        None => None,
    };
    if args.paused && qmp_path.is_none() {
        return Err(Error::Config(
            "-S needs --qmp: nothing else can start the guest".into(),
        ));
    }
    raise_open_files_limit();
    // Before any other thread starts (building the machine starts some), so that they all
    // inherit the signal mask.
    let signals = block_stop_signals();
    let machine = Machine::build(args)?;
    install_kick_handler()?;
    handle_stop_signals(
        signals,
        &machine.stop,
        seccomp::filter_for(args.seccomp, seccomp::signals_filter_with)?,
    )?;
    // The machine is built: from here the main thread starts the monitor and the guest, then
    // runs the console, reboots and the end, confined. (The QMP threads start under this filter
    // and add their own; the socket appears only once the main thread is confined.)
    if let Some(f) = seccomp::filter_for(args.seccomp, seccomp::main_filter_with)? {
        seccomp::apply(&f)?;
    }
    let control = Arc::new(MachineControl::new(machine.clone()));
    let server = match &qmp_path {
        Some(p) => {
            let setup = ThreadSetup {
                serve: confine(seccomp::filter_for(args.seccomp, seccomp::qmp_filter_with)?),
                events: confine(seccomp::filter_for(
                    args.seccomp,
                    seccomp::qmp_events_filter_with,
                )?),
            };
            let (server, sink) = QmpServer::start_confined(p, control.clone(), setup)
                .map_err(|e| Error::Config(format!("--qmp: {e}")))?;
            control.set_events(sink);
            Some(server)
        }
        None => None,
    };
    if !args.paused {
        machine.start()?;
    }
    let reason = loop {
        let reason = console_loop(&|| machine.serial(), &machine.stop)?;
        let StopReason::Reset(source) = reason else {
            break reason;
        };
        if args.no_reboot {
            break reason;
        }
        // Reboot in place: a new run of the guest, same devices at the same addresses.
        match machine.reboot() {
            Ok(Some(_)) => control.events().reset(source.by_guest(), source.cause()),
            Ok(None) => {}
            Err(e) => break StopReason::Error(format!("reboot failed: {e}")),
        }
    };
    machine.shut_down();
    let (guest, why) = match &reason {
        StopReason::Reset(source) => (source.by_guest(), source.cause()),
        StopReason::PowerOff(_) => (true, "guest-shutdown"),
        StopReason::Signal(_) => (false, "host-signal"),
        StopReason::Quit => (false, "host-qmp-quit"),
        StopReason::Error(_) => (false, "host-error"),
    };
    control.events().shutdown(guest, why);
    if let Some(s) = server {
        s.shutdown();
    }
    let _ = std::io::stdout().flush();
    match &reason {
        StopReason::Error(msg) => eprintln!("vmm: {msg}"),
        other => tracing::info!("guest stopped: {other:?}"),
    }
    Ok(reason.exit_code())
}

/// Raises this process's soft limit on open files to its hard limit, as QEMU does (since 9.0):
/// a virtio-rng function holds 5 descriptors (its queue's ioeventfd, 2 MSI-X irqfds, the INTx
/// eventfds), more with more queues, vectors or a backend, so the usual soft limit of 1,024
/// would stop a machine at ~200 functions.
/// The soft limit only protects programs that use `select()`, and the vmm never does. A limit
/// that cannot be raised is kept with a warning on stderr: the machine may still fit in it.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the struct we own and pass by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        let e = std::io::Error::last_os_error();
        eprintln!("vmm: warning: cannot read the open-files limit: {e}");
        return;
    }
    if limit.rlim_cur >= limit.rlim_max {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit only reads the struct we pass; it changes this process's limit alone.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        let e = std::io::Error::last_os_error();
        eprintln!(
            "vmm: warning: cannot raise the open-files limit from {} to {}: {e}",
            limit.rlim_cur, limit.rlim_max
        );
        return;
    }
    tracing::debug!(
        "open-files limit raised from {} to {}",
        limit.rlim_cur,
        limit.rlim_max
    );
}

/// A QMP thread's set-up that installs `filter`.
fn confine(filter: Option<seccomp::Filter>) -> Option<ThreadInit> {
    filter
        .map(|f| -> ThreadInit { Box::new(move || seccomp::apply(&f).map_err(|e| e.to_string())) })
}
