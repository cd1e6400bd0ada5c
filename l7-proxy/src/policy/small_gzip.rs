//! gzip for small whole bodies, with zlib sized to the body as nginx does.
//!
//! A deflate stream's fixed costs (clearing its hash table on reset, above all) are set by its
//! window and memory level, not by the input. flate2 always asks zlib for the largest of both
//! (32 KiB window, memory level 8: a 64 KiB hash table cleared per body), which costs more than
//! compressing a 1 KiB body. Here each body gets the smallest window that holds it and a memory
//! level reduced with it (nginx's `ngx_http_gzip_filter` rule), and the streams are kept per
//! thread and size class and reset between bodies. The output is ordinary gzip: the window
//! size is not part of the format a decoder needs. zlib produces the raw deflate data; the
//! 18 bytes of gzip framing (RFC 1952) are written here, with the CRC-32 from crc32fast, whose
//! SIMD code is several times faster than the CRC zlib computes for its own gzip wrapper.
//!
//! This is the one place that calls zlib's C API directly (through `libz-sys`, the crate flate2
//! itself uses), because flate2 does not expose the memory level. `gzip_strategy = "fixed"`
//! goes through [`super::fixed_deflate`] instead: see [`gzip_into`].

use std::cell::RefCell;
use std::ptr;

/// gzip member header (RFC 1952): magic, deflate, no flags, no mtime; XFL and OS follow.
const GZIP_HEADER: [u8; 8] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0];
/// OS byte: Unix, as zlib writes on this platform.
const GZIP_OS_UNIX: u8 = 3;

/// Huffman codes a deflate stream may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Codes built for each block from its own symbol counts (zlib's default).
    #[default]
    Default,
    /// Only the fixed codes of RFC 1951 §3.2.6, as HAProxy's libslz: no code tables to build
    /// and send, which on small bodies is most of the work, for a larger output.
    Fixed,
}

unsafe extern "C" fn zalloc(_: *mut libc::c_void, items: u32, size: u32) -> *mut libc::c_void {
    // SAFETY: plain C allocation for zlib, freed by `zfree`.
    unsafe { libc::calloc(items as usize, size as usize) }
}

unsafe extern "C" fn zfree(_: *mut libc::c_void, p: *mut libc::c_void) {
    // SAFETY: `p` came from `zalloc`.
    unsafe { libc::free(p) }
}

/// One raw deflate stream. Boxed because zlib keeps a pointer to it.
struct ZlibStream {
    strm: Box<libz_sys::z_stream>,
}

impl ZlibStream {
    fn new(level: i32, window_bits: i32, mem_level: i32, strategy: i32) -> std::io::Result<Self> {
        use libz_sys as z;
        let mut strm = Box::new(z::z_stream {
            next_in: ptr::null_mut(),
            avail_in: 0,
            total_in: 0,
            next_out: ptr::null_mut(),
            avail_out: 0,
            total_out: 0,
            msg: ptr::null_mut(),
            state: ptr::null_mut(),
            zalloc,
            zfree,
            opaque: ptr::null_mut(),
            data_type: 0,
            adler: 0,
            reserved: 0,
        });
        // SAFETY: `strm` is initialised as zlib requires and outlives the stream (it
        // is boxed, so it does not move); the version and size are this build's.
        let rc = unsafe {
            z::deflateInit2_(
                &mut *strm,
                level,
                z::Z_DEFLATED,
                -window_bits, // negative: raw deflate, the gzip framing is ours
                mem_level,
                strategy,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        if rc != z::Z_OK {
            return Err(std::io::Error::other(format!("deflateInit2 failed ({rc})")));
        }
        Ok(Self { strm })
    }

    /// Appends the raw deflate data of all of `data` to `out`.
    fn deflate_into(&mut self, data: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        use libz_sys as z;
        let s = &mut *self.strm;
        // SAFETY: the stream was initialised by deflateInit2.
        if unsafe { z::deflateReset(s) } != z::Z_OK {
            return Err(std::io::Error::other("deflateReset failed"));
        }
        // SAFETY: deflateBound only reads the stream's parameters.
        let bound = unsafe { z::deflateBound(s, data.len() as _) } as usize;
        out.reserve(bound);
        s.next_in = data.as_ptr() as *mut u8; // zlib never writes through next_in
        s.avail_in = data.len() as _;
        // SAFETY: `out` has at least `bound` bytes of spare capacity after its
        // contents.
        s.next_out = unsafe { out.as_mut_ptr().add(out.len()) };
        s.avail_out = bound as _;
        // SAFETY: next_in/avail_in describe `data`, next_out/avail_out the spare
        // capacity of `out`; with deflateBound's room one Z_FINISH call completes the
        // stream.
        let rc = unsafe { z::deflate(s, z::Z_FINISH) };
        let written = out.len() + bound - s.avail_out as usize;
        s.next_in = ptr::null_mut();
        s.next_out = ptr::null_mut();
        if rc != z::Z_STREAM_END {
            return Err(std::io::Error::other(format!("deflate failed ({rc})")));
        }
        // SAFETY: the contents before and zlib's output initialised the first
        // `written` bytes.
        unsafe { out.set_len(written) };
        Ok(())
    }
}

impl Drop for ZlibStream {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised by deflateInit2 and is ended once.
        unsafe { libz_sys::deflateEnd(&mut *self.strm) };
    }
}

/// Window bits and memory level for a body of `len` bytes (nginx's rule).
fn sizing(len: usize) -> (i32, i32) {
    let (mut window_bits, mut mem_level) = (15, 8);
    while window_bits > 9 && len < (1usize << (window_bits - 1)).saturating_sub(262) {
        window_bits -= 1;
        mem_level -= 1;
    }
    (window_bits, mem_level.max(1))
}

/// Level, window bits and memory level of a stream.
type Params = (i32, i32, i32);

thread_local! {
    /// zlib streams by parameters: at most seven sizes per level.
    static STREAMS: RefCell<Vec<(Params, ZlibStream)>> = const { RefCell::new(Vec::new()) };
}

/// Appends the gzip of `data` at `level` (1-9) to `out`, with a reused stream sized to it.
///
/// [`Strategy::Fixed`] needs level 1 (the policy's config check makes sure of it) and is
/// served by [`super::fixed_deflate`]: about a quarter of zlib-rs's `Z_FIXED` level 1 on a
/// 1 KiB JSON body, and a sixth of zlib's level 1, where zlib's own `Z_FIXED` saves nothing
/// (it still builds the dynamic code tables to compare).
pub fn gzip_into(
    data: &[u8],
    level: u32,
    strategy: Strategy,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    // XFL: 4 for the fastest level, 2 for the best, as zlib writes it.
    let xfl = match level {
        1 => 4,
        9 => 2,
        _ => 0,
    };
    out.extend_from_slice(&GZIP_HEADER);
    out.extend_from_slice(&[xfl, GZIP_OS_UNIX]);
    if strategy == Strategy::Fixed && level == 1 {
        super::fixed_deflate::deflate_into(data, out);
    } else {
        let (window_bits, mem_level) = sizing(data.len());
        let key = (level as i32, window_bits, mem_level);
        STREAMS.with_borrow_mut(|streams| {
            super::compress::pooled(streams, key, || {
                ZlibStream::new(key.0, window_bits, mem_level, libz_sys::Z_DEFAULT_STRATEGY)
            })?
            .deflate_into(data, out)
        })?;
    }
    out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes()); // ISIZE: mod 2^32
    Ok(())
}

/// The gzip of `data` at `level` (1-9); see [`gzip_into`].
pub fn gzip(data: &[u8], level: u32, strategy: Strategy) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    gzip_into(data, level, strategy, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn sizing_follows_nginx() {
        assert_eq!(sizing(100), (9, 2));
        assert_eq!(sizing(1024), (11, 4));
        assert_eq!(sizing(20_000), (15, 8));
        assert_eq!(sizing(64 * 1024), (15, 8));
    }

    #[test]
    fn every_size_class_round_trips() {
        let text: Vec<u8> = (0..70_000u32)
            .flat_map(|i| format!("{} ", i.wrapping_mul(2654435761) % 977).into_bytes())
            .take(70_000)
            .collect();
        let cases = [
            (1, Strategy::Default),
            (6, Strategy::Default),
            (9, Strategy::Default),
            (1, Strategy::Fixed),
        ];
        for len in [0, 1, 300, 700, 1024, 3000, 9000, 20_000, 40_000, 65_536] {
            for (level, strategy) in cases {
                // Twice: the second call reuses the stream.
                for _ in 0..2 {
                    let gz = gzip(&text[..len], level, strategy).unwrap();
                    let mut out = Vec::new();
                    let mut decoder = flate2::read::GzDecoder::new(&gz[..]);
                    decoder.read_to_end(&mut out).unwrap();
                    assert!(out == text[..len], "len {len} level {level} {strategy:?}");
                    // One complete member: the header, then nothing after the trailer.
                    let header = decoder.header().unwrap();
                    assert_eq!(header.operating_system(), GZIP_OS_UNIX);
                    assert_eq!(decoder.into_inner().len(), 0);
                    // zlib's own gzip reader checks the trailer with its own CRC code.
                    let mut inflate = flate2::Decompress::new_gzip(15);
                    let mut again = Vec::with_capacity(len + 1);
                    let status = inflate
                        .decompress_vec(&gz, &mut again, flate2::FlushDecompress::Finish)
                        .unwrap();
                    assert_eq!(status, flate2::Status::StreamEnd, "len {len}");
                    assert!(again == text[..len]);
                }
            }
        }
    }

    /// The first deflate block's type (RFC 1951 3.2.3: bits 1-2 of its first byte, after the
    /// 10-byte gzip header): 1 for fixed codes, 2 for dynamic ones.
    fn first_block_type(gz: &[u8]) -> u8 {
        (gz[10] >> 1) & 3
    }

    #[test]
    fn fixed_strategy_uses_fixed_codes_only() {
        let json: Vec<u8> = (0..40u32)
            .flat_map(|i| {
                format!(
                    r#"{{"id":{i},"name":"user {}","active":true}},"#,
                    i * 7919 % 1000
                )
                .into_bytes()
            })
            .collect();
        let dynamic = gzip(&json, 1, Strategy::Default).unwrap();
        let fixed = gzip(&json, 1, Strategy::Fixed).unwrap();
        assert_eq!(first_block_type(&dynamic), 2);
        assert_eq!(first_block_type(&fixed), 1);
        // Fixed codes still compress, less than codes fitted to the body.
        assert!(
            fixed.len() < json.len() / 2,
            "{} of {}",
            fixed.len(),
            json.len()
        );
        assert!(fixed.len() > dynamic.len());
    }
}
