//! Deflate with the fixed Huffman codes only, for whole small bodies: `gzip_strategy = "fixed"`.
//!
//! This is the approach of HAProxy's libslz (its default gzip): one greedy pass, one candidate
//! per position from a small hash table, and the fixed codes of RFC 1951 §3.2.6, so that there
//! are no code tables to count, build or send. The hash table is never cleared: it holds
//! positions, and a candidate counts only if it lies before the current position in this
//! body, within the window, and its bytes match, so entries left by an earlier body are
//! either rejected or are true matches in this one. On 1 KiB of JSON this costs about a
//! quarter of zlib-rs's level 1 with `Z_FIXED` (zlib-ng's `deflate_quick`, which this
//! replaces: it clears a 128 KiB hash table and copies the body into its window per call)
//! for about the same output. No Rust crate does this (libdeflate, zlib, zlib-rs and
//! miniz_oxide all clear or allocate tables per body); the output is checked against zlib's
//! decoder in the tests below.
//!
//! The body is one final block (a fixed-code block has no size limit); matches are 4 to 258
//! bytes long (the hash covers 4) at distances up to 32 KiB.

use std::cell::RefCell;

/// Hash table size, in bits, at most: 16384 positions (64 KiB). A body uses the first 1024,
/// 4096 or all of them, by its length: about one slot per byte or more, so that a small body
/// touches few cache lines of the table (1 KiB of JSON: 4 KiB of it, a quarter of the 4096
/// slots it took before, for the same matches; 4% less time in the proxy), and a large one
/// still finds its repeats. The sizes are constants (`BITS` of [`compress`]): a shift by a
/// variable amount in the loop costs 15% more time.
const MAX_HASH_BITS: u32 = 14;
/// Farthest match distance deflate allows.
const WINDOW: usize = 32 * 1024;
/// Longest match deflate allows.
const MAX_MATCH: usize = 258;
/// Shortest match searched for (the hash covers this many bytes).
const MIN_MATCH: usize = 4;

thread_local! {
    /// The hash table, reused between bodies without clearing (see the module doc).
    static TABLE: RefCell<Option<Box<[u32; 1 << MAX_HASH_BITS]>>> = const { RefCell::new(None) };
}

/// `bits` of `code` in reverse order: Huffman codes are sent from their most significant bit,
/// into a stream filled from each byte's least significant bit.
const fn reverse(code: u32, bits: u32) -> u32 {
    code.reverse_bits() >> (32 - bits)
}

/// The fixed code of literal/length symbol `sym` (RFC 1951 §3.2.6): (bits reversed, length).
const fn literal_code(sym: u32) -> (u32, u32) {
    let (code, bits) = match sym {
        0..=143 => (0x30 + sym, 8),
        144..=255 => (0x190 + sym - 144, 9),
        256..=279 => (sym - 256, 7),
        _ => (0xc0 + sym - 280, 8),
    };
    (reverse(code, bits), bits)
}

/// Code and extra bits of each length, for lengths 3 to 258, as one value and its bit count.
const LENGTHS: [(u32, u32); MAX_MATCH + 1] = {
    const BASE: [u32; 29] = [
        3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
        131, 163, 195, 227, 258,
    ];
    const EXTRA: [u32; 29] = [
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
    ];
    let mut table = [(0, 0); MAX_MATCH + 1];
    let mut len = 3;
    while len <= MAX_MATCH as u32 {
        // The last code whose base is at most `len`: 258 has its own (285).
        let mut i = 28;
        while BASE[i] > len {
            i -= 1;
        }
        let (code, bits) = literal_code(257 + i as u32);
        table[len as usize] = (code | (len - BASE[i]) << bits, bits + EXTRA[i]);
        len += 1;
    }
    table
};

/// The fixed codes of distance symbols 0 to 29 (5 bits each), bits reversed: a lookup
/// instead of reversing bits per match.
const DISTANCE_CODES: [u32; 30] = {
    let mut table = [0; 30];
    let mut i = 0;
    while i < 30 {
        table[i] = reverse(i as u32, 5);
        i += 1;
    }
    table
};

/// Code and extra bits of distance `dist` (1 to 32768), as one value and its bit count.
#[inline(always)]
fn distance_code(dist: usize) -> (u32, u32) {
    let x = (dist - 1) as u32;
    if x < 4 {
        return (DISTANCE_CODES[x as usize], 5);
    }
    // Codes 4 and up come in pairs per power of two, with `log2(x) - 1` extra bits.
    let log = 31 - x.leading_zeros();
    let extra = log - 1;
    let code = 2 * log + ((x >> extra) & 1);
    (
        DISTANCE_CODES[code as usize] | (x & ((1 << extra) - 1)) << 5,
        5 + extra,
    )
}

/// Writes bits from the least significant end, 32 at a time, into a slice sized beforehand.
struct BitWriter<'a> {
    out: &'a mut [u8],
    pos: usize,
    bits: u64,
    count: u32,
}

impl BitWriter<'_> {
    /// Appends the low `count` bits of `value` (at most 32).
    #[inline(always)]
    fn put(&mut self, value: u32, count: u32) {
        self.bits |= u64::from(value) << self.count;
        self.count += count;
        if self.count >= 32 {
            // As in `read_u32`: one bounds check, not two.
            let Some(word) = self.out[self.pos..].first_chunk_mut::<4>() else {
                panic!("output past its bound");
            };
            *word = (self.bits as u32).to_le_bytes();
            self.pos += 4;
            self.bits >>= 32;
            self.count -= 32;
        }
    }

    #[inline(always)]
    fn literal(&mut self, byte: u8) {
        let (code, bits) = LITERALS[byte as usize];
        self.put(code, bits);
    }

    /// Writes `data[from..to]` as literals. ASCII (below 128, as JSON, HTML and most text)
    /// has 8-bit codes, each its byte plus 0x30 with the bits reversed (RFC 1951 §3.2.6): up
    /// to eight such bytes are coded at once in a word, with no table lookups.
    #[inline(always)]
    fn literals(&mut self, data: &[u8], mut from: usize, to: usize) {
        while to - from >= 4 {
            let n = (to - from).min(8);
            let Some(chunk) = data[from..].first_chunk::<8>() else {
                break;
            };
            // The run's bytes only (`n` is 4 to 8).
            let mask = u64::MAX >> (64 - 8 * n);
            let bytes = u64::from_le_bytes(*chunk) & mask;
            if bytes & 0x8080_8080_8080_8080 != 0 {
                break;
            }
            // Per byte: + 0x30 (no carry below 128), then its bits reversed in place.
            let codes = (bytes + 0x3030_3030_3030_3030).reverse_bits().swap_bytes() & mask;
            self.put(codes as u32, 32);
            self.put((codes >> 32) as u32, 8 * (n as u32 - 4));
            from += n;
        }
        for &byte in &data[from..to] {
            self.literal(byte);
        }
    }

    /// Writes the last partial byte; returns the length written.
    fn finish(mut self) -> usize {
        while self.count > 0 {
            self.out[self.pos] = self.bits as u8;
            self.pos += 1;
            self.bits >>= 8;
            self.count = self.count.saturating_sub(8);
        }
        self.pos
    }
}

/// The fixed codes of the 256 literals.
const LITERALS: [(u32, u32); 256] = {
    let mut table = [(0, 0); 256];
    let mut i = 0;
    while i < 256 {
        table[i] = literal_code(i as u32);
        i += 1;
    }
    table
};

/// The most bytes [`deflate_into`] writes for `len` input bytes: 9 bits per literal at worst,
/// plus the block header and end code, rounded up, plus the writer's 4-byte step.
pub fn bound(len: usize) -> usize {
    (len * 9 + 3 + 7).div_ceil(8) + 8
}

/// The 4 bytes at `at`, little-endian. Taken as the first chunk of `data[at..]` rather than
/// as `data[at..at + 4]`, whose end may overflow and is checked apart: 10% less time on the
/// JSON body (`cargo bench -p l7-proxy --bench policy_chain -- fixed_deflate`).
#[inline(always)]
fn read_u32(data: &[u8], at: usize) -> u32 {
    match data[at..].first_chunk::<4>() {
        Some(word) => u32::from_le_bytes(*word),
        None => panic!("read past the end"),
    }
}

/// The slot of the 4 bytes `word` in a table of `2^BITS` (multiplicative hashing: the top
/// bits).
#[inline(always)]
fn slot<const BITS: u32>(word: u32) -> usize {
    (word.wrapping_mul(0x9E37_79B1) >> (32 - BITS)) as usize
}

/// How many bytes from `a` and `b` (`a < b`) agree, up to `max`, given that their first
/// [`MIN_MATCH`] do. Eight at a time over two slices cut to `max` once, so the loop carries
/// no bounds checks.
#[inline(always)]
fn match_length(data: &[u8], a: usize, b: usize, max: usize) -> usize {
    let (older, newer) = (&data[a + MIN_MATCH..a + max], &data[b + MIN_MATCH..b + max]);
    let ((old_words, old_tail), (new_words, new_tail)) =
        (older.as_chunks::<8>(), newer.as_chunks::<8>());
    let mut len = MIN_MATCH;
    for (x, y) in old_words.iter().zip(new_words) {
        let diff = u64::from_le_bytes(*x) ^ u64::from_le_bytes(*y);
        if diff != 0 {
            return len + (diff.trailing_zeros() / 8) as usize;
        }
        len += 8;
    }
    len + old_tail
        .iter()
        .zip(new_tail)
        .take_while(|(x, y)| x == y)
        .count()
}

/// Codes all of `data` into `w` (block header excepted), finding repeats with the first
/// `2^BITS` slots of `table`.
#[inline(always)]
fn compress<const BITS: u32>(
    data: &[u8],
    table: &mut [u32; 1 << MAX_HASH_BITS],
    w: &mut BitWriter,
) {
    let mut pos = 0;
    // Literals are written in runs, when a match or the end comes: up to eight at once.
    let mut literals_from = 0;
    if data.len() >= MIN_MATCH {
        let last = data.len() - MIN_MATCH;
        while pos <= last {
            let word = read_u32(data, pos);
            let at = slot::<BITS>(word);
            let candidate = table[at] as usize;
            table[at] = pos as u32;
            if candidate < pos && pos - candidate <= WINDOW && read_u32(data, candidate) == word {
                w.literals(data, literals_from, pos);
                let len = match_length(data, candidate, pos, MAX_MATCH.min(data.len() - pos));
                let (len_code, len_bits) = LENGTHS[len];
                let (dist_code, dist_bits) = distance_code(pos - candidate);
                w.put(len_code | dist_code << len_bits, len_bits + dist_bits);
                pos += len;
                literals_from = pos;
                // The match's last position too, for the next repeat of what follows.
                if pos <= last {
                    let before = pos - 1;
                    table[slot::<BITS>(read_u32(data, before))] = before as u32;
                }
            } else {
                pos += 1;
            }
        }
    }
    w.literals(data, literals_from, data.len());
}

/// Appends raw deflate data (one final block with fixed codes) for all of `data` to `out`.
///
/// Bodies up to 4 GiB (positions are kept as `u32`); the compress policy sends at most
/// `ONE_SHOT_MAX` (64 KiB) this way.
pub fn deflate_into(data: &[u8], out: &mut Vec<u8>) {
    assert!(u32::try_from(data.len()).is_ok(), "body over 4 GiB");
    let start = out.len();
    out.resize(start + bound(data.len()), 0);
    let written = TABLE.with_borrow_mut(|table| {
        let table = table.get_or_insert_with(|| Box::new([0; 1 << MAX_HASH_BITS]));
        let mut w = BitWriter {
            out: &mut out[start..],
            pos: 0,
            bits: 0,
            count: 0,
        };
        // BFINAL = 1, BTYPE = 01 (fixed codes).
        w.put(0b011, 3);
        match data.len() {
            0..=1024 => compress::<10>(data, table, &mut w),
            1025..=4096 => compress::<12>(data, table, &mut w),
            _ => compress::<MAX_HASH_BITS>(data, table, &mut w),
        }
        let (end, end_bits) = literal_code(256);
        w.put(end, end_bits);
        w.finish()
    });
    out.truncate(start + written);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn inflate(raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(raw)
            .read_to_end(&mut out)
            .expect("zlib decodes the stream");
        out
    }

    fn round_trip(data: &[u8]) -> usize {
        let mut raw = Vec::new();
        deflate_into(data, &mut raw);
        assert!(raw.len() <= bound(data.len()));
        // One final block with fixed codes.
        assert_eq!(raw[0] & 0b111, 0b011);
        assert!(
            inflate(&raw) == data,
            "{} bytes do not round-trip",
            data.len()
        );
        raw.len()
    }

    /// xorshift64: reproducible pseudo-random bytes.
    fn noise(seed: u64, len: usize, alphabet: u8) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % u64::from(alphabet)) as u8
            })
            .collect()
    }

    #[test]
    fn short_and_empty_bodies_round_trip() {
        for len in 0..40 {
            round_trip(&noise(len as u64, len, 3));
            round_trip(&vec![b'a'; len]);
        }
    }

    #[test]
    fn every_length_and_distance_code_round_trips() {
        // Runs of each length after a distinct prefix exercise every length code (3..=258
        // through matches of 4 and up, cut at 258) and distances from 1 to the window.
        for len in [
            4, 5, 10, 11, 18, 19, 34, 35, 66, 67, 130, 131, 227, 257, 258, 259, 600,
        ] {
            let mut data = noise(len as u64, 50, 255);
            data.extend(std::iter::repeat_n(b'z', len));
            round_trip(&data);
        }
        // Distances: a random unit repeated (short distances), or a random prefix repeated
        // after a run of zeros (which take one hash slot), so that every distance code is
        // sent. The repeat is matched, not sent as 300 literals.
        for dist in [
            1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 17, 25, 33, 64, 65, 129, 256, 257, 1024, 1025, 4097,
            16384, 16385, 24577, 32767, 32768,
        ] {
            let mut data = noise(dist as u64 + 7, dist.min(300), 255);
            data.resize(dist, 0);
            let alone = round_trip(&data);
            for i in 0..300 {
                data.push(data[i]);
            }
            let size = round_trip(&data);
            assert!(
                size <= alone + 20,
                "distance {dist}: {alone} then {size} bytes"
            );
        }
        // Beyond the window: no match, still decodes.
        let mut far = noise(3, 300, 255);
        far.resize(40_000, 0);
        far.extend_from_within(..300);
        round_trip(&far);
    }

    #[test]
    fn random_bodies_round_trip_and_json_compresses() {
        for seed in 0..200u64 {
            let len = (seed as usize * 977) % 70_000;
            let alphabet = [2, 4, 16, 64, 255][seed as usize % 5];
            round_trip(&noise(seed, len, alphabet));
        }
        let json: Vec<u8> = (0..300u32)
            .flat_map(|i| {
                format!(
                    r#"{{"id":{},"name":"user {}","email":"u{}@example.com","active":true}},"#,
                    10_000 + i,
                    i * 7919 % 1000,
                    i * 31 % 97
                )
                .into_bytes()
            })
            .collect();
        let size = round_trip(&json);
        assert!(size < json.len() / 3, "{size} of {}", json.len());
    }

    #[test]
    fn entries_left_by_an_earlier_body_are_never_wrong() {
        // A long body fills the table with positions past the end of the short ones that
        // follow, and positions inside them that hold other bytes.
        let long = noise(1, 60_000, 20);
        round_trip(&long);
        for seed in 2..60 {
            round_trip(&noise(seed, 30 + seed as usize * 50, 20));
            round_trip(&long[..seed as usize * 999]);
        }
    }
}
