//! Issue "virtio block, network and console devices with real backends": a real Linux guest on
//! the test ground (L1 KVM host) uses virtio-blk (a raw image in L1's tmpfs), virtio-net (a tap
//! the vmm creates, configured by L1) and virtio-console (a file in L1; a second one on a unix
//! socket, talked to by `usock`, resources/linux/usock.c), and L1 checks what arrived. One L1 boot, two guest boots: DEVICES (everything at once) and READBACK (the disk
//! again, read back by a fresh guest). Error texts are checked on the local KVM.

use std::sync::OnceLock;

use integration_tests::ground::{
    build_part, guest_boot, host_script, last_attempt, run_host_scenario_with, section,
    BOOT_DEADLINE_SECS, HANG_RETRY_MARKER,
};
use integration_tests::probe::{probe_elf, vmm};

const TAP: &str = "vmmtap0";
const CONSOLE_TEXT: &str = "hello from the guest console 42";

/// The guest side of the DEVICES boot. Disks are found by serial, not by name.
const GUEST_DEVICES: &str = r#"
echo "=== DRIVERS-BEGIN ==="
lspci -n
for d in /sys/bus/pci/devices/*; do echo "pci $(basename $d) $(basename "$(readlink $d/driver)")"; done
for d in /sys/bus/virtio/devices/*; do echo "virtio $(basename $d) $(cat $d/device) $(basename "$(readlink $d/driver)")"; done
echo "=== DRIVERS-END ==="
echo "=== BLK-BEGIN ==="
for b in /sys/block/vd*; do
    s=$(cat $b/serial)
    echo "blk size=$(cat $b/size) ro=$(cat $b/ro) serial=$s"
    [ "$s" = rw-disk ] && RW=/dev/$(basename $b)
    [ "$s" = ro-disk ] && RO=/dev/$(basename $b)
done
i=0; while [ $i -lt 256 ]; do printf 'VMM-BLK-PATTERN-%04d-abcdefghij\n' $i; i=$((i+1)); done > /tmp/pattern
echo "guest-md5 $(md5sum < /tmp/pattern | cut -d' ' -f1)"
dd if=/tmp/pattern of=$RW bs=4096 seek=1 conv=fsync 2>/dev/null; echo "write-rc $?"
echo 3 > /proc/sys/vm/drop_caches
echo "reread-md5 $(dd if=$RW bs=4096 skip=1 count=2 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "ro-read $(dd if=$RO bs=16 count=1 2>/dev/null)"
echo garbage | dd of=$RO bs=512 count=1 conv=sync,fsync 2>/dev/null; echo "ro-write-rc $?"
echo "=== BLK-END ==="
echo "=== NET-BEGIN ==="
echo "mac $(cat /sys/class/net/eth0/address)"
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up
ping -c 3 -W 3 10.0.2.1; echo "ping-rc $?"
echo "=== NET-END ==="
echo "=== CONSOLE-BEGIN ==="
ls /dev/hvc0 /dev/hvc1
echo "hello from the guest console 42" > /dev/hvc0; echo "hvc0-rc $?"
exec 3<>/dev/hvc1
echo guest-ready >&3
read -t 30 line <&3; echo "hvc1-read-rc $?"
echo "guest-got: $line" >&3
exec 3>&-
echo "hvc1-line $line"
echo "=== CONSOLE-END ==="
"#;

const GUEST_READBACK: &str = r#"
echo "=== READBACK-BEGIN ==="
echo "readback-md5 $(dd if=/dev/vda bs=4096 skip=1 count=2 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "=== READBACK-END ==="
"#;

fn host() -> &'static str {
    static OUT: OnceLock<String> = OnceLock::new();
    OUT.get_or_init(|| {
        let devices = format!(
            "--device virtio-blk-pci,id=disk0,addr=04.0,file=$TMPDIR/disk.img,serial=rw-disk \
             --device virtio-blk-pci,id=disk1,addr=05.0,file=$TMPDIR/ro.img,readonly=on,serial=ro-disk \
             --device virtio-net-pci,id=net0,addr=06.0,tap={TAP} \
             --device virtio-console-pci,id=con0,addr=07.0,path=$TMPDIR/console.txt \
             --device virtio-console-pci,id=con1,addr=08.0,socket=$TMPDIR/console.sock"
        );
        let usock_cpio = build_part("build-usock.sh").unwrap_or_else(|e| panic!("{e}"));
        // In direct mode the scenario runs usock from the cache, next to its cpio.
        let usock = usock_cpio.with_file_name("usock").display().to_string();
        let deadline = BOOT_DEADLINE_SECS;
        let retry = HANG_RETRY_MARKER;
        // The DEVICES boot runs the vmm in the background: L1 configures the tap once the
        // vmm has created it, and connects to the console socket with usock. A vmm still
        // running after the deadline is reported by vmmwatch and the boot is run once more,
        // on fresh images (the test ground reports hangs). The kernel runs without KASLR, so
        // the RIPs in vmmwatch's report match System.map; the report has the devices' `info
        // virtio` too. (It stays quiet: kernel messages could split the guest's lines.)
        let setup = format!(
            r#"USOCK=$(command -v usock || echo '{usock}')
cat > "$TMPDIR/guest-devices.sh" <<'GUEST_SCRIPT_EOF'
{GUEST_DEVICES}
GUEST_SCRIPT_EOF
mkguestinitrd "$TMPDIR/guest-devices.cpio.gz" "$TMPDIR/guest-devices.sh" || exit 90
devices_boot() {{
    rm -f $TMPDIR/console.txt $TMPDIR/sock-out.txt
    dd if=/dev/zero of=$TMPDIR/disk.img bs=1M count=16 2>/dev/null
    dd if=/dev/zero of=$TMPDIR/ro.img bs=1M count=1 2>/dev/null
    printf RO-DISK-ORIGINAL | dd of=$TMPDIR/ro.img conv=notrunc 2>/dev/null
    ro_md5=$(md5sum < $TMPDIR/ro.img)
    vmmwatch --qmp $TMPDIR/qmp.sock {deadline} "$VMM" run --no-reboot --kernel "$GUEST_KERNEL" \
        --initrd "$TMPDIR/guest-devices.cpio.gz" --append 'console=ttyS0 quiet nokaslr panic=-1 reboot=t' \
        --memory 256 --qmp unix:$TMPDIR/qmp.sock,server=on,wait=off {devices} &
    pid=$!
    i=0; while [ ! -e /sys/class/net/{TAP} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
    ip addr add 10.0.2.1/24 dev {TAP} && ip link set {TAP} up && echo "L1: {TAP} up"
    test -S $TMPDIR/console.sock && echo "L1: console socket listening"
    "$USOCK" $TMPDIR/console.sock guest-ready 'input-from-host\n' guest-got 120 > $TMPDIR/sock-out.txt 2>&1 &
    upid=$!
    wait $pid; rc=$?
    wait $upid; urc=$?
}}
echo '=== BOOT-DEVICES-BEGIN ==='
devices_boot
if [ $rc = 124 ]; then echo '{retry}'; devices_boot; fi
echo "=== BOOT-DEVICES-END rc=$rc ==="
echo "usock-rc $urc"
echo '=== SOCKET-OUT-BEGIN ==='; cat $TMPDIR/sock-out.txt; echo; echo '=== SOCKET-OUT-END ==='

echo '=== HOST-CHECK-BEGIN ==='
echo "host-md5 $(dd if=$TMPDIR/disk.img bs=4096 skip=1 count=2 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "ro-unchanged $(test "$(md5sum < $TMPDIR/ro.img)" = "$ro_md5" && echo yes || echo no) size $(wc -c < $TMPDIR/ro.img)"
echo "tap-gone $(test -e /sys/class/net/{TAP} && echo no || echo yes)"
echo "console-file:"; cat $TMPDIR/console.txt
echo '=== HOST-CHECK-END ==='
"#
        );
        let script = host_script(&[
            setup,
            guest_boot(
                "READBACK",
                "--device virtio-blk-pci,id=disk0,addr=04.0,file=$TMPDIR/disk.img,serial=rw-disk",
                Some(GUEST_READBACK),
            ),
        ]);
        let out = run_host_scenario_with(&script, &[usock_cpio])
            .unwrap_or_else(|e| panic!("test ground: {e}"));
        assert_eq!(out.rc, 0, "host scenario failed:\n{}", out.stdout);
        out.stdout
    })
}

/// Section `name` of the guest's output in boot `label` (which must have exited 0).
fn guest_section(label: &str, name: &str) -> String {
    let out = host();
    assert!(
        out.contains(&format!("=== BOOT-{label}-END rc=0 ===")),
        "vmm did not exit 0 for {label}:\n{out}"
    );
    let boot = section(out, &format!("BOOT-{label}")).expect("boot section");
    let boot = last_attempt(&boot);
    section(boot, name).unwrap_or_else(|| panic!("no {name} section in {label}:\n{boot}"))
}

fn host_check() -> String {
    section(host(), "HOST-CHECK").unwrap_or_else(|| panic!("no HOST-CHECK:\n{}", host()))
}

/// The value after `key ` on the first line starting with it.
fn value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no '{key}' in:\n{text}"))
        .trim()
        .to_string()
}

#[test]
fn linux_binds_blk_net_and_console_at_the_requested_addresses() {
    let d = guest_section("DEVICES", "DRIVERS");
    for line in [
        "00:04.0 0100: 1af4:1042 (rev 01)",
        "00:05.0 0100: 1af4:1042 (rev 01)",
        "00:06.0 0200: 1af4:1041 (rev 01)",
        "00:07.0 0780: 1af4:1043 (rev 01)",
        "00:08.0 0780: 1af4:1043 (rev 01)",
    ] {
        assert!(d.contains(line), "lspci lacks {line}:\n{d}");
    }
    for a in ["04.0", "05.0", "06.0", "07.0", "08.0"] {
        assert!(
            d.contains(&format!("pci 0000:00:{a} virtio-pci")),
            "{a} not bound to virtio-pci:\n{d}"
        );
    }
    for (id, drv) in [
        ("0x0002", "virtio_blk"),
        ("0x0001", "virtio_net"),
        ("0x0003", "virtio_console"),
    ] {
        assert!(
            d.lines()
                .any(|l| l.starts_with("virtio ") && l.contains(id) && l.ends_with(drv)),
            "no virtio device {id} bound to {drv}:\n{d}"
        );
    }
}

#[test]
fn guest_writes_reach_the_host_image_and_a_second_boot_reads_them_back() {
    let b = guest_section("DEVICES", "BLK");
    assert!(
        b.contains("blk size=32768 ro=0 serial=rw-disk"),
        "16 MiB rw disk:\n{b}"
    );
    assert_eq!(value(&b, "write-rc"), "0", "{b}");
    let want = value(&b, "guest-md5");
    assert_eq!(want.len(), 32, "{b}");
    assert_eq!(value(&b, "reread-md5"), want, "read back in the same boot");
    assert_eq!(
        value(&host_check(), "host-md5"),
        want,
        "the host-side image holds the guest's data"
    );
    let r = guest_section("READBACK", "READBACK");
    assert_eq!(
        value(&r, "readback-md5"),
        want,
        "a second boot reads it back"
    );
}

#[test]
fn a_readonly_disk_is_read_only_in_the_guest_and_on_the_host() {
    let b = guest_section("DEVICES", "BLK");
    assert!(
        b.contains("blk size=2048 ro=1 serial=ro-disk"),
        "1 MiB ro disk:\n{b}"
    );
    assert_eq!(value(&b, "ro-read"), "RO-DISK-ORIGINAL", "{b}");
    assert_ne!(value(&b, "ro-write-rc").as_str(), "0", "{b}");
    let h = host_check();
    assert_eq!(
        value(&h, "ro-unchanged"),
        "yes size 1048576",
        "the readonly image was modified:\n{h}"
    );
}

#[test]
fn guest_pings_the_host_end_of_the_tap() {
    let n = guest_section("DEVICES", "NET");
    assert!(
        n.contains("3 packets transmitted, 3 packets received"),
        "{n}"
    );
    assert_eq!(value(&n, "ping-rc"), "0", "{n}");
    let mac = value(&n, "mac");
    assert!(mac.starts_with("52:54:00:"), "default MAC {mac}");
    assert!(
        host().contains(&format!("L1: {TAP} up")),
        "L1 never saw the tap the vmm creates"
    );
    assert_eq!(
        value(&host_check(), "tap-gone"),
        "yes",
        "the vmm's tap outlived it"
    );
}

#[test]
fn guest_console_output_arrives_in_the_host_file() {
    let c = guest_section("DEVICES", "CONSOLE");
    assert_eq!(value(&c, "hvc0-rc"), "0", "{c}");
    assert!(
        host().contains("L1: console socket listening"),
        "the vmm did not listen on the console socket"
    );
}

#[test]
fn a_socket_client_and_the_guest_talk_over_the_console() {
    let c = guest_section("DEVICES", "CONSOLE");
    assert_eq!(
        value(&c, "hvc1-read-rc"),
        "0",
        "the guest got no input:\n{c}"
    );
    assert_eq!(value(&c, "hvc1-line"), "input-from-host", "{c}");
    let out = section(host(), "SOCKET-OUT").expect("SOCKET-OUT section");
    assert!(out.contains("guest-ready"), "client output:\n{out}");
    assert!(
        out.contains("guest-got: input-from-host"),
        "client output:\n{out}"
    );
    assert_eq!(value(host(), "usock-rc"), "0", "client output:\n{out}");
    let h = host_check();
    let file = h.split("console-file:").nth(1).unwrap_or_default();
    assert_eq!(
        file.replace('\r', "").trim(),
        CONSOLE_TEXT,
        "console file:\n{h}"
    );
}

fn vmm_err(devices: &[&str]) -> (Option<i32>, String) {
    let elf = probe_elf();
    let mut args = vec!["run", "--no-reboot", "--kernel", elf.to_str().unwrap()];
    for d in devices {
        args.push("--device");
        args.push(d);
    }
    let out = vmm(&args, 30);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn backend_and_property_errors_are_clear() {
    let cases: &[(&str, &str)] = &[
        (
            "virtio-blk-pci,id=d0,file=/nonexistent/disk.img",
            "vmm: d0: Could not open '/nonexistent/disk.img': No such file or directory",
        ),
        (
            "virtio-blk-pci,id=d0",
            "vmm: d0: 'file' property is required",
        ),
        (
            "virtio-blk-pci,file=x,readonly=maybe",
            "vmm: Property 'virtio-blk-pci.readonly' can't take value 'maybe': expected 'on' or 'off'",
        ),
        (
            "virtio-console-pci,id=c0,path=/nonexistent/dir/out.txt",
            "vmm: c0: Could not open '/nonexistent/dir/out.txt': No such file or directory",
        ),
        (
            "virtio-console-pci,id=c0",
            "vmm: c0: give exactly one of 'path' or 'socket'",
        ),
        (
            "virtio-net-pci,tap=a/b",
            "vmm: Property 'virtio-net-pci.tap' can't take value 'a/b': expected an interface name (1 to 15 characters, no '/')",
        ),
        (
            "virtio-net-pci,tap=t0,mac=01:00:5e:00:00:01",
            "vmm: Property 'virtio-net-pci.mac' can't take value '01:00:5e:00:00:01': expected a unicast MAC address such as 52:54:00:12:34:56",
        ),
    ];
    for (device, want) in cases {
        let (code, err) = vmm_err(&[device]);
        assert_eq!(code, Some(1), "{device}: {err}");
        assert_eq!(&err, want, "{device}");
    }
}

#[test]
fn help_lists_the_new_drivers() {
    let out = vmm(&["run", "--help"], 10);
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "virtio-blk-pci",
        "virtio-net-pci",
        "virtio-console-pci",
        "readonly",
        "serial",
        "tap",
        "mac",
        "socket",
    ] {
        assert!(help.contains(word), "help lacks {word}:\n{help}");
    }
}
