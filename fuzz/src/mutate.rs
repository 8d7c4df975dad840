//! A small byte-level mutator (libFuzzer-style operations, no coverage feedback) and the
//! xorshift PRNG that drives it.

/// xorshift64* PRNG.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (any value; 0 is remapped).
    pub fn new(seed: u64) -> Self {
        XorShift(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    0x10,
    0x20,
    0x3f,
    0x40,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x1000,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xe000_0000,
    0xffff_fff0,
    0xffff_ffff,
    u64::MAX,
    u64::MAX - 1,
];

/// Applies 1 to 4 random mutations to `data` (kept at most `max_len` bytes). `pool` gives
/// material for splicing; `dict` tokens to insert.
pub fn mutate(
    data: &mut Vec<u8>,
    rng: &mut XorShift,
    pool: &[Vec<u8>],
    dict: &[&[u8]],
    max_len: usize,
) {
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let len = data.len() as u64;
        match rng.below(11) {
            // Flip a bit.
            0 if len > 0 => {
                let i = rng.below(len) as usize;
                data[i] ^= 1 << rng.below(8);
            }
            // Random byte.
            1 if len > 0 => {
                let i = rng.below(len) as usize;
                data[i] = rng.next_u64() as u8;
            }
            // Insert random bytes.
            2 => {
                let i = rng.below(len + 1) as usize;
                let n = 1 + rng.below(8) as usize;
                for k in 0..n {
                    data.insert(i + k, rng.next_u64() as u8);
                }
            }
            // Delete a range.
            3 if len > 0 => {
                let i = rng.below(len) as usize;
                let n = (1 + rng.below(16) as usize).min(data.len() - i);
                data.drain(i..i + n);
            }
            // Duplicate a range.
            4 if len > 0 => {
                let i = rng.below(len) as usize;
                let n = (1 + rng.below(32) as usize).min(data.len() - i);
                let chunk: Vec<u8> = data[i..i + n].to_vec();
                let at = rng.below(data.len() as u64 + 1) as usize;
                data.splice(at..at, chunk);
            }
            // Overwrite with an interesting value (1, 2, 4 or 8 bytes, little-endian).
            5 | 6 if len > 0 => {
                let v = INTERESTING[rng.below(INTERESTING.len() as u64) as usize];
                let w = [1usize, 2, 4, 8][rng.below(4) as usize];
                let i = rng.below(len) as usize;
                for (k, b) in v.to_le_bytes()[..w].iter().enumerate() {
                    if let Some(x) = data.get_mut(i + k) {
                        *x = *b;
                    }
                }
            }
            // Add to a byte.
            7 if len > 0 => {
                let i = rng.below(len) as usize;
                data[i] = data[i].wrapping_add((rng.below(35) as u8).wrapping_sub(17));
            }
            // Insert a dictionary token.
            8 if !dict.is_empty() => {
                let tok = dict[rng.below(dict.len() as u64) as usize];
                let i = rng.below(len + 1) as usize;
                data.splice(i..i, tok.iter().copied());
            }
            // Splice with another input.
            9 if !pool.is_empty() => {
                let other = &pool[rng.below(pool.len() as u64) as usize];
                if !other.is_empty() {
                    let a = rng.below(other.len() as u64) as usize;
                    let b = a + rng.below((other.len() - a) as u64 + 1) as usize;
                    let i = rng.below(len + 1) as usize;
                    let j = i + rng.below(len - i as u64 + 1) as usize;
                    data.splice(i..j, other[a..b].iter().copied());
                }
            }
            // Truncate.
            10 if len > 1 => {
                let n = rng.below(len) as usize;
                data.truncate(n);
            }
            _ => {
                data.push(rng.next_u64() as u8);
            }
        }
    }
    data.truncate(max_len);
}

/// Values a JSON leaf may be replaced with.
fn json_value(rng: &mut XorShift, strings: &[&str]) -> serde_json::Value {
    use serde_json::{json, Value};
    match rng.below(12) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(INTERESTING[rng.below(INTERESTING.len() as u64) as usize]),
        4 => json!(1.5),
        5 => json!(""),
        6 => json!([]),
        7 => json!({}),
        8 => json!(rng.below(300)),
        9 => json!(-(rng.below(1 << 40) as i64)),
        _ if !strings.is_empty() => json!(strings[rng.below(strings.len() as u64) as usize]),
        _ => json!("x"),
    }
}

/// [`mutate_json`] on one random line of `data` that is JSON (a QMP stream). False when no
/// line is.
pub fn mutate_json_lines(data: &mut Vec<u8>, rng: &mut XorShift, strings: &[&str]) -> bool {
    let lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let start = rng.below(lines.len() as u64) as usize;
    for k in 0..lines.len() {
        let i = (start + k) % lines.len();
        let mut line = lines[i].to_vec();
        if mutate_json(&mut line, rng, strings) {
            // Keep the mutated line on one line.
            line.retain(|&b| b != b'\n');
            let mut out = Vec::with_capacity(data.len() + line.len());
            for (j, l) in lines.iter().enumerate() {
                if j > 0 {
                    out.push(b'\n');
                }
                out.extend_from_slice(if j == i { &line } else { l });
            }
            *data = out;
            return true;
        }
    }
    false
}

/// Structure-aware mutation of a JSON document: replaces, removes, duplicates or edits one
/// node. Returns false (and leaves `data` alone) when `data` is not JSON.
pub fn mutate_json(data: &mut Vec<u8>, rng: &mut XorShift, strings: &[&str]) -> bool {
    use serde_json::Value;
    let Ok(mut v) = serde_json::from_slice::<Value>(data) else {
        return false;
    };
    // Count nodes, pick one by pre-order index.
    fn count(v: &Value) -> u64 {
        1 + match v {
            Value::Array(a) => a.iter().map(count).sum(),
            Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }
    fn nth<'a>(v: &'a mut Value, n: &mut u64) -> Option<&'a mut Value> {
        if *n == 0 {
            return Some(v);
        }
        *n -= 1;
        match v {
            Value::Array(a) => a.iter_mut().find_map(|c| nth(c, n)),
            Value::Object(o) => o.values_mut().find_map(|c| nth(c, n)),
            _ => None,
        }
    }
    let total = count(&v);
    let mut k = rng.below(total);
    let Some(node) = nth(&mut v, &mut k) else {
        return false;
    };
    match (rng.below(6), &mut *node) {
        (0, Value::Object(o)) if !o.is_empty() => {
            let key = o.keys().nth(rng.below(o.len() as u64) as usize).cloned();
            if let Some(key) = key {
                o.remove(&key);
            }
        }
        (1, Value::Object(o)) => {
            let key = if strings.is_empty() || rng.below(2) == 0 {
                format!("k{}", rng.below(4))
            } else {
                strings[rng.below(strings.len() as u64) as usize].to_string()
            };
            o.insert(key, json_value(rng, strings));
        }
        (0 | 1, Value::Array(a)) if !a.is_empty() => {
            let i = rng.below(a.len() as u64) as usize;
            if rng.below(2) == 0 {
                a.remove(i);
            } else {
                let c = a[i].clone();
                a.push(c);
            }
        }
        (2, Value::String(s)) => {
            let mut b = s.clone().into_bytes();
            mutate(&mut b, rng, &[], &[], 64);
            *s = String::from_utf8_lossy(&b).into_owned();
        }
        (3, Value::Number(n)) => {
            let x = n.as_i64().unwrap_or(0);
            *node = serde_json::json!(x.wrapping_add(rng.below(5) as i64 - 2));
        }
        _ => *node = json_value(rng, strings),
    }
    let out = if rng.below(2) == 0 {
        serde_json::to_vec(&v)
    } else {
        serde_json::to_vec_pretty(&v)
    };
    match out {
        Ok(o) => {
            *data = o;
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_bounded_and_change_things() {
        let mut rng = XorShift::new(42);
        let pool = vec![b"hello".to_vec()];
        let mut changed = 0;
        for _ in 0..1000 {
            let mut d = b"abcdefgh".to_vec();
            mutate(&mut d, &mut rng, &pool, &[b"TOKEN"], 16);
            assert!(d.len() <= 16);
            changed += usize::from(d != b"abcdefgh");
        }
        assert!(changed > 900);
    }

    #[test]
    fn the_prng_is_deterministic() {
        let a: Vec<u64> = (0..4)
            .scan(XorShift::new(7), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..4)
            .scan(XorShift::new(7), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a[0], a[1]);
    }
}
