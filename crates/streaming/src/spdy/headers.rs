//! SPDY/3 header blocks: `count:32 (len:32 name len:32 value)*`, zlib
//! compressed with a preset dictionary. Each direction of a session is one
//! zlib stream, so a compressor/decompressor lives as long as the session and
//! every block ends with a sync flush.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::dictionary::DICTIONARY;

/// A decoded block larger than this is refused: a few stream headers are
/// well under a kilobyte, and zlib expands by up to 1000x.
const MAX_DECODED: usize = 64 * 1024;

pub(crate) type Headers = Vec<(String, String)>;

#[derive(Debug, thiserror::Error)]
pub(crate) enum HeaderError {
    #[error("header compression: {0}")]
    Compress(String),
    #[error("header decompression: {0}")]
    Decompress(String),
    #[error("header block exceeds {MAX_DECODED} bytes")]
    TooLarge,
    #[error("malformed header block")]
    Malformed,
}

pub(crate) fn get<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

pub(crate) struct Encoder {
    z: Compress,
}

impl Encoder {
    pub(crate) fn new() -> Result<Self, HeaderError> {
        let mut z = Compress::new(Compression::best(), true);
        z.set_dictionary(&DICTIONARY)
            .map_err(|e| HeaderError::Compress(e.to_string()))?;
        Ok(Encoder { z })
    }

    pub(crate) fn encode(&mut self, headers: &[(&str, &str)]) -> Result<Vec<u8>, HeaderError> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            // spdystream rejects names that are not lower case.
            let name = name.to_ascii_lowercase();
            raw.extend_from_slice(&(name.len() as u32).to_be_bytes());
            raw.extend_from_slice(name.as_bytes());
            raw.extend_from_slice(&(value.len() as u32).to_be_bytes());
            raw.extend_from_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut consumed = 0;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(256);
            }
            let before = self.z.total_in();
            self.z
                .compress_vec(&raw[consumed..], &mut out, FlushCompress::Sync)
                .map_err(|e| HeaderError::Compress(e.to_string()))?;
            consumed += (self.z.total_in() - before) as usize;
            // Done once all input is in and zlib left spare room (so the
            // flush was not cut short by a full buffer).
            if consumed == raw.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

pub(crate) struct Decoder {
    z: Decompress,
}

impl Decoder {
    pub(crate) fn new() -> Self {
        Decoder {
            z: Decompress::new(true),
        }
    }

    pub(crate) fn decode(&mut self, block: &[u8]) -> Result<Headers, HeaderError> {
        let mut out = Vec::with_capacity(1024);
        let mut consumed = 0;
        loop {
            if out.len() >= MAX_DECODED {
                return Err(HeaderError::TooLarge);
            }
            if out.capacity() == out.len() {
                out.reserve(out.len().min(MAX_DECODED - out.len()).max(1024));
            }
            let (in_before, out_before) = (self.z.total_in(), out.len());
            let mut dictionary_set = false;
            match self
                .z
                .decompress_vec(&block[consumed..], &mut out, FlushDecompress::Sync)
            {
                Ok(Status::Ok) | Ok(Status::BufError) => {}
                Ok(Status::StreamEnd) => {
                    return Err(HeaderError::Decompress("zlib stream ended".into()))
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(&DICTIONARY)
                        .map_err(|e| HeaderError::Decompress(e.to_string()))?;
                    dictionary_set = true;
                }
                Err(e) => return Err(HeaderError::Decompress(e.to_string())),
            }
            consumed += (self.z.total_in() - in_before) as usize;
            let progressed = self.z.total_in() != in_before || out.len() != out_before;
            if consumed == block.len() && out.len() < out.capacity() {
                break;
            }
            if !progressed && !dictionary_set {
                // Nothing more to get out of this block.
                break;
            }
        }
        parse(&out)
    }
}

fn parse(raw: &[u8]) -> Result<Headers, HeaderError> {
    let mut at = 0;
    let mut next = |n: usize| -> Result<&[u8], HeaderError> {
        let s = raw.get(at..at + n).ok_or(HeaderError::Malformed)?;
        at += n;
        Ok(s)
    };
    let u32_at = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let count = u32_at(next(4)?);
    let mut headers = Vec::new();
    for _ in 0..count {
        let n = u32_at(next(4)?);
        let name = String::from_utf8(next(n)?.to_vec()).map_err(|_| HeaderError::Malformed)?;
        let n = u32_at(next(4)?);
        // Several values of one header are NUL-separated.
        let value = String::from_utf8_lossy(next(n)?).replace('\0', ",");
        headers.push((name, value));
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_over_one_context() {
        let mut enc = Encoder::new().unwrap();
        let mut dec = Decoder::new();
        for i in 0..3 {
            let port = i.to_string();
            let block = enc
                .encode(&[("streamType", "data"), ("port", &port)])
                .unwrap();
            let h = dec.decode(&block).unwrap();
            assert_eq!(get(&h, "streamtype"), Some("data"));
            assert_eq!(get(&h, "port"), Some(port.as_str()));
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Decoder::new().decode(b"not zlib at all").is_err());
        assert!(parse(&[0, 0, 0, 2, 0, 0, 0, 9]).is_err());
    }
}
