//! Frame encodings negotiated in the hello: `x-snappy-framed` (Kong's, raw Snappy blocks) and
//! `x-zstd` (ours, one zstd frame per message).
//!
//! Decoding is the place where a hostile peer could make us allocate without bound, so both
//! decoders refuse an over-cap message before allocating for it:
//! Snappy by its length header, zstd by its content-size header (when present) and by a hard
//! cap on the streamed output (always).

use std::io::Read;

/// zstd level for `x-zstd`. Measured with `cargo bench --bench frames` on an 8.1 MB full sync
/// of 10k entities: level 1 encodes in 5.8 ms to 746 KB, level 3 in 10.3 ms to 840 KB;
/// decoding takes ~2 ms for both. On one ~1 KB entity the sizes are equal (534 / 531 bytes).
const ZSTD_LEVEL: i32 = 1;

/// The largest zstd window we accept, as a power of two (16 MiB).
/// Our encoder uses at most 2^21 at level 3; a larger declared window would only make the
/// decoder allocate a buffer the sender chose.
const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// A frame encoding, as named in `rpc_frame_encodings` / `rpc_frame_encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// Raw Snappy block format (`snap::raw`), despite the name: this is what Kong sends.
    SnappyFramed,
    /// One zstd frame per message, with the content size in the frame header.
    Zstd,
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The message decompresses (or claims to decompress) to more than the cap.
    /// `size` is the claimed size when the header gave one, else the cap plus one.
    #[error("decompressed message too large: {size} bytes, limit {limit}")]
    TooLarge { size: u64, limit: usize },
    /// The frame is not valid for its encoding.
    #[error("corrupt {encoding} frame: {detail}")]
    Corrupt {
        encoding: &'static str,
        detail: String,
    },
    /// The message could not be compressed (Snappy refuses inputs over ~4 GiB).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// Picks the encoding for a peer that offered `offered`: zstd when offered, else Snappy.
pub fn choose(offered: &[String]) -> Option<Encoding> {
    let has = |enc: Encoding| offered.iter().any(|name| name == enc.name());
    [Encoding::Zstd, Encoding::SnappyFramed]
        .into_iter()
        .find(|&enc| has(enc))
}

/// Compresses one JSON message into one frame payload.
///
/// # Panics
///
/// If `json` is over 4 GiB, Snappy's input limit (see [`try_encode`]). Messages are bounded
/// by `max_payload` long before that.
pub fn encode(encoding: Encoding, json: &[u8]) -> Vec<u8> {
    match try_encode(encoding, json) {
        Ok(frame) => frame,
        Err(err) => panic!("{err}"),
    }
}

/// [`encode`], reporting the two ways compression can fail (an input over 4 GiB for
/// Snappy, no memory for a zstd context) instead of panicking.
pub fn try_encode(encoding: Encoding, json: &[u8]) -> Result<Vec<u8>, CodecError> {
    match encoding {
        Encoding::SnappyFramed => snap::raw::Encoder::new()
            .compress_vec(json)
            .map_err(|err| CodecError::Encode(err.to_string())),
        Encoding::Zstd if json.len() < STORED_BELOW => Ok(zstd_stored(json)),
        Encoding::Zstd => ZSTD_COMPRESSOR.with(|compressor| {
            let mut compressor = compressor.borrow_mut();
            match compressor.as_mut() {
                Some(compressor) => compressor.compress(json),
                None => zstd::bulk::compress(json, ZSTD_LEVEL),
            }
            .map_err(|err| CodecError::Encode(err.to_string()))
        }),
    }
}

/// Messages shorter than this go as a zstd frame of one raw (stored) block: a status report
/// or an "up to date" answer gains a few bytes at most from compression, and decoding
/// Huffman tables for it costs the receiver more than the message itself (issue 11: a
/// control plane reads one report per data plane per version).
const STORED_BELOW: usize = 256;

/// A zstd frame (RFC 8878 §3.1.1) holding `json` as one raw block: magic number, a frame
/// header with Single_Segment set and a 1-byte Frame_Content_Size, one last raw block.
fn zstd_stored(json: &[u8]) -> Vec<u8> {
    debug_assert!(json.len() < STORED_BELOW);
    let mut frame = Vec::with_capacity(json.len() + 9);
    frame.extend_from_slice(&0xFD2F_B528u32.to_le_bytes());
    frame.push(0b0010_0000); // FCS_Field_Size 1 byte, Single_Segment, no checksum, no dict
    frame.push(json.len() as u8);
    // Block header: Last_Block = 1, Block_Type = Raw (0), Block_Size = len.
    let header = 1u32 | ((json.len() as u32) << 3);
    frame.extend_from_slice(&header.to_le_bytes()[..3]);
    frame.extend_from_slice(json);
    frame
}

/// Decompresses one frame payload, refusing anything over `max_decompressed` bytes without
/// allocating for it.
pub fn decode(
    encoding: Encoding,
    frame: &[u8],
    max_decompressed: usize,
) -> Result<Vec<u8>, CodecError> {
    match encoding {
        Encoding::SnappyFramed => decode_snappy(frame, max_decompressed),
        Encoding::Zstd => decode_zstd(frame, max_decompressed),
    }
}

// === impl Encoding ===

impl Encoding {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::SnappyFramed => "x-snappy-framed",
            Encoding::Zstd => "x-zstd",
        }
    }

    /// The encoding with this wire name, if we know it.
    pub fn from_name(name: &str) -> Option<Encoding> {
        match name {
            "x-snappy-framed" => Some(Encoding::SnappyFramed),
            "x-zstd" => Some(Encoding::Zstd),
            _ => None,
        }
    }
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

// === decoders ===

thread_local! {
    /// One compression context per thread: creating a zstd context costs more than
    /// compressing a small message. `None` if zstd could not allocate one.
    static ZSTD_COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok());

    /// The same for one-shot decompression of frames that declare their size.
    static ZSTD_DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().ok());
}

fn decode_snappy(frame: &[u8], max_decompressed: usize) -> Result<Vec<u8>, CodecError> {
    let corrupt = |err: snap::Error| CodecError::Corrupt {
        encoding: Encoding::SnappyFramed.name(),
        detail: err.to_string(),
    };
    // The header is a varint of the uncompressed length; `decompress_vec` would allocate
    // exactly that much, so check it first.
    let len = snap::raw::decompress_len(frame).map_err(corrupt)?;
    if len > max_decompressed {
        return Err(CodecError::TooLarge {
            size: len as u64,
            limit: max_decompressed,
        });
    }
    snap::raw::Decoder::new()
        .decompress_vec(frame)
        .map_err(corrupt)
}

fn decode_zstd(frame: &[u8], max_decompressed: usize) -> Result<Vec<u8>, CodecError> {
    let corrupt = |detail: String| CodecError::Corrupt {
        encoding: Encoding::Zstd.name(),
        detail,
    };
    let too_large = |size: u64| CodecError::TooLarge {
        size,
        limit: max_decompressed,
    };
    match zstd::zstd_safe::get_frame_content_size(frame) {
        Err(_) => return Err(corrupt("not a zstd frame".to_owned())),
        Ok(Some(size)) if size > max_decompressed as u64 => return Err(too_large(size)),
        // Our encoder always writes the size: decode in one shot into a buffer of exactly
        // the declared size (at most the cap). Output beyond it is an error, not a realloc.
        Ok(Some(size)) => {
            // The frame may be followed by more frames, whose sizes are not declared here;
            // the one-shot decoder fails on those rather than growing the buffer.
            return ZSTD_DECOMPRESSOR
                .with(|decompressor| match decompressor.borrow_mut().as_mut() {
                    Some(decompressor) => decompressor.decompress(frame, size as usize),
                    None => zstd::bulk::decompress(frame, size as usize),
                })
                .map_err(|err| corrupt(err.to_string()));
        }
        Ok(None) => {}
    }
    // Content size unknown (a streamed frame): decode with a hard cap on the output and on
    // the window the decoder may allocate.
    let mut decoder =
        zstd::stream::read::Decoder::with_buffer(frame).map_err(|err| corrupt(err.to_string()))?;
    let window_log = ZSTD_WINDOW_LOG_MAX.min(ceil_log2(max_decompressed).max(10));
    decoder
        .window_log_max(window_log)
        .map_err(|err| corrupt(err.to_string()))?;
    let mut out = Vec::new();
    let limit = max_decompressed as u64 + 1;
    decoder
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|err| corrupt(err.to_string()))?;
    if out.len() > max_decompressed {
        return Err(too_large(limit));
    }
    Ok(out)
}

fn ceil_log2(n: usize) -> u32 {
    usize::BITS - n.saturating_sub(1).leading_zeros()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const GIB: u64 = 1 << 30;

    fn sample_json() -> Vec<u8> {
        let entities: Vec<_> = (0..200)
            .map(
                |i| serde_json::json!({"id": format!("{i:08}"), "host": "example.com", "port": 80}),
            )
            .collect();
        serde_json::to_vec(&serde_json::json!({"default": {"deltas": entities}})).unwrap()
    }

    #[test]
    fn names_round_trip_and_choice_prefers_zstd() {
        for enc in [Encoding::SnappyFramed, Encoding::Zstd] {
            assert_eq!(Encoding::from_name(enc.name()), Some(enc));
        }
        assert_eq!(Encoding::from_name("gzip"), None);
        let offered = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            choose(&offered(&["x-snappy-framed", "x-zstd"])),
            Some(Encoding::Zstd)
        );
        assert_eq!(
            choose(&offered(&["x-snappy-framed"])),
            Some(Encoding::SnappyFramed)
        );
        assert_eq!(choose(&offered(&["gzip"])), None);
        assert_eq!(choose(&[]), None);
    }

    #[test]
    fn round_trips() {
        let json = sample_json();
        for enc in [Encoding::SnappyFramed, Encoding::Zstd] {
            for input in [&b""[..], b"{}", &json] {
                let frame = encode(enc, input);
                assert_eq!(decode(enc, &frame, input.len()).unwrap(), input, "{enc}");
            }
            let frame = encode(enc, &json);
            assert!(frame.len() < json.len() / 2, "{enc} compresses");
        }
    }

    #[test]
    fn short_messages_are_stored_frames_any_zstd_decoder_reads() {
        for len in [
            0usize,
            1,
            100,
            STORED_BELOW - 1,
            STORED_BELOW,
            STORED_BELOW + 1,
        ] {
            let json: Vec<u8> = (0..len).map(|i| b"{\"a\":1}"[i % 7]).collect();
            let frame = encode(Encoding::Zstd, &json);
            if len < STORED_BELOW {
                assert_eq!(frame.len(), len + 9, "stored: 9 bytes of framing");
                assert_eq!(&frame[9..], &json[..]);
            } else {
                assert!(frame.len() < len, "compressed from {STORED_BELOW} bytes on");
            }
            // The reference decoder, one-shot and streaming, and our own with its caps.
            assert_eq!(zstd::bulk::decompress(&frame, len).unwrap(), json, "{len}");
            assert_eq!(zstd::stream::decode_all(&frame[..]).unwrap(), json, "{len}");
            assert_eq!(
                zstd::zstd_safe::get_frame_content_size(&frame).unwrap(),
                Some(len as u64)
            );
            assert_eq!(decode(Encoding::Zstd, &frame, len).unwrap(), json);
            if len > 0 {
                assert!(matches!(
                    decode(Encoding::Zstd, &frame, len - 1),
                    Err(CodecError::TooLarge { .. })
                ));
            }
        }
    }

    #[test]
    fn snappy_is_the_raw_block_format() {
        // Raw format: varint length header, then a literal. The framing format would start
        // with the stream identifier chunk `ff 06 00 00 sNaPpY`.
        let frame = encode(Encoding::SnappyFramed, b"hello");
        assert_eq!(frame, b"\x05\x10hello");
        assert_eq!(
            decode(Encoding::SnappyFramed, b"\x05\x10hello", 5).unwrap(),
            b"hello"
        );
    }

    #[test]
    fn exact_cap_is_allowed_one_more_is_not() {
        let json = sample_json();
        for enc in [Encoding::SnappyFramed, Encoding::Zstd] {
            let frame = encode(enc, &json);
            assert!(decode(enc, &frame, json.len()).is_ok());
            assert!(matches!(
                decode(enc, &frame, json.len() - 1),
                Err(CodecError::TooLarge { .. })
            ));
        }
    }

    #[test]
    fn corrupt_input_is_an_error() {
        let json = sample_json();
        for enc in [Encoding::SnappyFramed, Encoding::Zstd] {
            let mut frame = encode(enc, &json);
            let n = frame.len();
            frame[n / 2..].fill(0xa5);
            assert!(matches!(
                decode(enc, &frame, 1 << 20),
                Err(CodecError::Corrupt { .. })
            ));
            frame.truncate(3);
            assert!(matches!(
                decode(enc, &frame, 1 << 20),
                Err(CodecError::Corrupt { .. })
            ));
            assert!(decode(enc, b"", 1 << 20).is_err());
            assert!(decode(enc, b"not compressed json", 1 << 20).is_err());
        }
    }

    #[test]
    fn snappy_bomb_claimed_is_refused_before_allocating() {
        // A 1 GiB length header followed by a handful of bytes.
        let mut frame = Vec::new();
        let mut n = GIB;
        while n >= 0x80 {
            frame.push((n as u8) | 0x80);
            n >>= 7;
        }
        frame.push(n as u8);
        frame.extend_from_slice(b"\x00\x00");
        assert_eq!(
            decode(Encoding::SnappyFramed, &frame, 16 << 20),
            Err(CodecError::TooLarge {
                size: GIB,
                limit: 16 << 20
            })
        );
    }

    #[test]
    fn snappy_bomb_real_is_refused() {
        // 64 MiB of zeros (Snappy's best ratio is ~21:1, so a real 1 GiB would cost 1 GiB
        // to build here; the header check is the same).
        let zeros = vec![0u8; 64 << 20];
        let frame = encode(Encoding::SnappyFramed, &zeros);
        assert!(frame.len() < 4 << 20);
        assert_eq!(
            decode(Encoding::SnappyFramed, &frame, 16 << 20),
            Err(CodecError::TooLarge {
                size: 64 << 20,
                limit: 16 << 20
            })
        );
    }

    /// A zstd frame of `n` zeros, compressed as a stream without allocating `n` bytes.
    fn zstd_zeros(n: u64, pledge_size: bool) -> Vec<u8> {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        if pledge_size {
            encoder.set_pledged_src_size(Some(n)).unwrap();
            encoder.include_contentsize(true).unwrap();
        } else {
            encoder.include_contentsize(false).unwrap();
        }
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..n / chunk.len() as u64 {
            encoder.write_all(&chunk).unwrap();
        }
        encoder.finish().unwrap()
    }

    #[test]
    fn zstd_bomb_claimed_in_header_is_refused() {
        let frame = zstd_zeros(GIB, true);
        assert!(frame.len() < 1 << 20, "{}", frame.len());
        assert_eq!(
            decode(Encoding::Zstd, &frame, 16 << 20),
            Err(CodecError::TooLarge {
                size: GIB,
                limit: 16 << 20
            })
        );
    }

    #[test]
    fn zstd_bomb_without_size_is_cut_at_the_cap() {
        let frame = zstd_zeros(GIB, false);
        assert!(
            matches!(zstd::zstd_safe::get_frame_content_size(&frame), Ok(None)),
            "streamed frame declares no size"
        );
        assert_eq!(
            decode(Encoding::Zstd, &frame, 16 << 20),
            Err(CodecError::TooLarge {
                size: (16 << 20) + 1,
                limit: 16 << 20
            })
        );
        // And a small streamed frame still decodes.
        let small = zstd_zeros(1 << 20, false);
        assert_eq!(
            decode(Encoding::Zstd, &small, 1 << 20).unwrap().len(),
            1 << 20
        );
    }

    #[test]
    fn zstd_header_that_understates_the_size_is_an_error() {
        // Declares 1 MiB, holds 2 MiB: the one-shot decoder must fail, not grow.
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        encoder.set_pledged_src_size(Some(1 << 20)).unwrap();
        encoder.include_contentsize(true).unwrap();
        encoder.write_all(&vec![0u8; 1 << 20]).unwrap();
        let mut frame = encoder.finish().unwrap();
        frame.extend(zstd_zeros(1 << 20, false));
        assert!(matches!(
            decode(Encoding::Zstd, &frame, 16 << 20),
            Err(CodecError::Corrupt { .. })
        ));
    }

    #[test]
    fn zstd_huge_window_is_refused() {
        // An empty frame whose header asks for a 32 MiB window (window descriptor 0x78 →
        // windowLog 25) and declares no content size. zstd's own default limit (2^27)
        // accepts it; ours, derived from the 16 MiB cap, does not.
        let frame = [0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x78, 0x01, 0x00, 0x00];
        assert_eq!(zstd::stream::decode_all(&frame[..]).unwrap(), b"");
        assert!(matches!(
            decode(Encoding::Zstd, &frame, 16 << 20),
            Err(CodecError::Corrupt { .. })
        ));
    }
}
