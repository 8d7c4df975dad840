//! A minimal MC146818 CMOS real-time clock at ports 0x70 (index) and 0x71 (data).
//!
//! Time registers read the host's UTC time in BCD, 24-hour mode; the update-in-progress bit is
//! never set, so a guest reading the clock never waits. Other CMOS bytes are plain storage.
//! Without it Linux's rtc_cmos spends seconds deciding the clock is "broken or not accessible".

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

/// The index port; the data port follows it.
pub const RTC_PORT: u64 = 0x70;
/// Ports decoded.
pub const RTC_PORT_LEN: u64 = 2;

const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const CENTURY: usize = 0x32;

/// The clock and its 128 bytes of CMOS.
pub struct Rtc {
    state: Mutex<(u8, [u8; 128])>,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// Civil date (year, month, day) from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The time registers for `secs` since the epoch: (register, BCD value).
pub fn time_registers(secs: u64) -> [(usize, u8); 8] {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil(days);
    let weekday = ((days + 4).rem_euclid(7) + 1) as u64; // 1 = Sunday
    [
        (0x00, bcd(rem % 60)),
        (0x02, bcd(rem / 60 % 60)),
        (0x04, bcd(rem / 3600)),
        (0x06, bcd(weekday)),
        (0x07, bcd(d)),
        (0x08, bcd(m)),
        (0x09, bcd(y.rem_euclid(100) as u64)),
        (CENTURY, bcd((y / 100) as u64)),
    ]
}

impl Rtc {
    /// A clock with status registers as firmware leaves them.
    pub fn new() -> Self {
        let mut cmos = [0u8; 128];
        cmos[REG_A] = 0x26; // 32.768 kHz divider, 1024 Hz rate, no update in progress
        cmos[REG_B] = 0x02; // 24-hour mode, BCD
        cmos[REG_D] = 0x80; // valid RAM and time
        Rtc {
            state: Mutex::new((0, cmos)),
        }
    }
}

impl BusDevice for Rtc {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(b) = data.first_mut() else { return };
        let Ok(mut s) = self.state.lock() else {
            *b = 0xff;
            return;
        };
        if offset == 0 {
            *b = s.0;
            return;
        }
        let index = usize::from(s.0 & 0x7f);
        if index <= 0x09 || index == CENTURY {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            for (r, v) in time_registers(now) {
                s.1[r] = v;
            }
        }
        *b = s.1[index];
        if index == REG_C {
            s.1[REG_C] = 0; // reading C acknowledges interrupts
        }
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        let (Some(&v), Ok(mut s)) = (data.first(), self.state.lock()) else {
            return;
        };
        if offset == 0 {
            s.0 = v;
            return;
        }
        let index = usize::from(s.0 & 0x7f);
        match index {
            REG_C | REG_D => {}             // read-only
            REG_A => s.1[REG_A] = v & 0x7f, // UIP is read-only
            _ => s.1[index] = v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_registers_are_bcd_utc() {
        // 2026-11-25 19:25:07 UTC, a Wednesday.
        let t = time_registers(1_795_634_707);
        let get = |r: usize| t.iter().find(|(i, _)| *i == r).unwrap().1;
        assert_eq!(get(0x00), 0x07);
        assert_eq!(get(0x02), 0x25);
        assert_eq!(get(0x04), 0x19);
        assert_eq!(get(0x06), 0x04);
        assert_eq!(get(0x07), 0x25);
        assert_eq!(get(0x08), 0x11);
        assert_eq!(get(0x09), 0x26);
        assert_eq!(get(CENTURY), 0x20);
        let e = time_registers(0);
        assert_eq!((e[4].1, e[5].1, e[6].1), (0x01, 0x01, 0x70));
    }

    #[test]
    fn index_data_protocol_and_read_only_registers() {
        let rtc = Rtc::new();
        let read = |i: u8| {
            rtc.write(RTC_PORT, 0, &[i]);
            let mut d = [0u8];
            rtc.read(RTC_PORT, 1, &mut d);
            d[0]
        };
        assert_eq!(read(0x0a) & 0x80, 0, "never update-in-progress");
        assert_eq!(read(0x0d), 0x80);
        rtc.write(RTC_PORT, 0, &[0x20]);
        rtc.write(RTC_PORT, 1, &[0x5a]);
        assert_eq!(read(0x20), 0x5a, "CMOS RAM keeps what is written");
        rtc.write(RTC_PORT, 0, &[0x0d]);
        rtc.write(RTC_PORT, 1, &[0]);
        assert_eq!(read(0x0d), 0x80);
        // NMI-disable bit in the index is ignored for addressing.
        assert_eq!(read(0x8d), 0x80);
    }
}
