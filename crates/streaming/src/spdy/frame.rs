//! SPDY/3 frame layout (draft-mbelshe-httpbis-spdy-00, section 2.2).
//!
//! Control frame: `1 | version:15 | type:16 | flags:8 | length:24 | payload`.
//! Data frame:    `0 | stream-id:31 | flags:8 | length:24 | payload`.

use tokio::io::{AsyncRead, AsyncReadExt};

pub(crate) const VERSION: u16 = 3;

pub(crate) const TYPE_SYN_STREAM: u16 = 1;
pub(crate) const TYPE_SYN_REPLY: u16 = 2;
pub(crate) const TYPE_RST_STREAM: u16 = 3;
pub(crate) const TYPE_SETTINGS: u16 = 4;
pub(crate) const TYPE_PING: u16 = 6;
pub(crate) const TYPE_GOAWAY: u16 = 7;
pub(crate) const TYPE_HEADERS: u16 = 8;
pub(crate) const TYPE_WINDOW_UPDATE: u16 = 9;

pub(crate) const FLAG_FIN: u8 = 0x01;

pub(crate) const RST_REFUSED_STREAM: u32 = 3;

/// Control frames are small (headers of a handful of streams); bigger ones
/// are refused rather than buffered.
pub(crate) const MAX_CONTROL_PAYLOAD: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("connection i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("unsupported SPDY version {0}")]
    Version(u16),
    #[error("control frame of {0} bytes exceeds the {MAX_CONTROL_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("truncated {0} frame")]
    Truncated(&'static str),
}

/// The 8-byte frame header; a data frame's payload is left on the wire so
/// that it can be copied out in bounded chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Head {
    Control {
        kind: u16,
        flags: u8,
        len: usize,
    },
    Data {
        stream_id: u32,
        flags: u8,
        len: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Control {
    SynStream {
        stream_id: u32,
        flags: u8,
        block: Vec<u8>,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        block: Vec<u8>,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings,
    Ping {
        id: u32,
    },
    GoAway,
    Headers {
        stream_id: u32,
        flags: u8,
        block: Vec<u8>,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    /// Frame types SPDY/3 tells receivers to ignore (e.g. CREDENTIAL).
    Other,
}

/// Reads the next frame header; `Ok(None)` on a clean EOF between frames.
pub(crate) async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Head>, FrameError> {
    let mut h = [0u8; 8];
    let n = r.read(&mut h).await?;
    if n == 0 {
        return Ok(None);
    }
    r.read_exact(&mut h[n..]).await?;
    let len = usize::from(h[5]) << 16 | usize::from(h[6]) << 8 | usize::from(h[7]);
    let flags = h[4];
    if h[0] & 0x80 != 0 {
        let version = u16::from_be_bytes([h[0] & 0x7f, h[1]]);
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        if len > MAX_CONTROL_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        let kind = u16::from_be_bytes([h[2], h[3]]);
        Ok(Some(Head::Control { kind, flags, len }))
    } else {
        let stream_id = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        Ok(Some(Head::Data {
            stream_id,
            flags,
            len,
        }))
    }
}

fn be32(p: &[u8], at: usize, what: &'static str) -> Result<u32, FrameError> {
    p.get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(FrameError::Truncated(what))
}

/// Parses a control frame's payload (already read, `len` bytes).
pub(crate) fn parse_control(kind: u16, flags: u8, p: Vec<u8>) -> Result<Control, FrameError> {
    const ID: u32 = 0x7fff_ffff;
    Ok(match kind {
        TYPE_SYN_STREAM => {
            // stream-id, associated-id, priority/unused, slot, header block.
            let stream_id = be32(&p, 0, "SYN_STREAM")? & ID;
            if p.len() < 10 {
                return Err(FrameError::Truncated("SYN_STREAM"));
            }
            Control::SynStream {
                stream_id,
                flags,
                block: p[10..].to_vec(),
            }
        }
        TYPE_SYN_REPLY => {
            let stream_id = be32(&p, 0, "SYN_REPLY")? & ID;
            Control::SynReply {
                stream_id,
                flags,
                block: p[4..].to_vec(),
            }
        }
        TYPE_HEADERS => {
            let stream_id = be32(&p, 0, "HEADERS")? & ID;
            Control::Headers {
                stream_id,
                flags,
                block: p[4..].to_vec(),
            }
        }
        TYPE_RST_STREAM => Control::RstStream {
            stream_id: be32(&p, 0, "RST_STREAM")? & ID,
            status: be32(&p, 4, "RST_STREAM")?,
        },
        TYPE_SETTINGS => Control::Settings,
        TYPE_PING => Control::Ping {
            id: be32(&p, 0, "PING")?,
        },
        TYPE_GOAWAY => Control::GoAway,
        TYPE_WINDOW_UPDATE => Control::WindowUpdate {
            stream_id: be32(&p, 0, "WINDOW_UPDATE")? & ID,
            delta: be32(&p, 4, "WINDOW_UPDATE")? & ID,
        },
        _ => Control::Other,
    })
}

fn control(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = Vec::with_capacity(8 + len);
    out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.push(flags);
    // Payloads here are header blocks and fixed fields, far below 2^24.
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.extend_from_slice(payload);
    out
}

pub(crate) fn encode_data(stream_id: u32, fin: bool, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + data.len());
    out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
    out.push(if fin { FLAG_FIN } else { 0 });
    out.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(data);
    out
}

pub(crate) fn encode_syn_reply(stream_id: u32, fin: bool, block: &[u8]) -> Vec<u8> {
    let mut p = stream_id.to_be_bytes().to_vec();
    p.extend_from_slice(block);
    control(TYPE_SYN_REPLY, if fin { FLAG_FIN } else { 0 }, &p)
}

/// SYN_STREAM is only sent by clients; the tests' client uses it.
#[cfg(test)]
pub(crate) fn encode_syn_stream(stream_id: u32, fin: bool, block: &[u8]) -> Vec<u8> {
    let mut p = stream_id.to_be_bytes().to_vec();
    p.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    p.extend_from_slice(block);
    control(TYPE_SYN_STREAM, if fin { FLAG_FIN } else { 0 }, &p)
}

pub(crate) fn encode_rst(stream_id: u32, status: u32) -> Vec<u8> {
    let mut p = stream_id.to_be_bytes().to_vec();
    p.extend_from_slice(&status.to_be_bytes());
    control(TYPE_RST_STREAM, 0, &p)
}

pub(crate) fn encode_ping(id: u32) -> Vec<u8> {
    control(TYPE_PING, 0, &id.to_be_bytes())
}

pub(crate) fn encode_goaway(last_good: u32) -> Vec<u8> {
    let mut p = last_good.to_be_bytes().to_vec();
    p.extend_from_slice(&0u32.to_be_bytes());
    control(TYPE_GOAWAY, 0, &p)
}

pub(crate) fn encode_window_update(stream_id: u32, delta: u32) -> Vec<u8> {
    let mut p = stream_id.to_be_bytes().to_vec();
    p.extend_from_slice(&delta.to_be_bytes());
    control(TYPE_WINDOW_UPDATE, 0, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip() {
        let mut wire = encode_rst(5, RST_REFUSED_STREAM);
        wire.extend(encode_data(7, true, b"hi"));
        let mut r = &wire[..];
        let Some(Head::Control { kind, flags, len }) = read_head(&mut r).await.unwrap() else {
            panic!("control expected")
        };
        assert_eq!((kind, len), (TYPE_RST_STREAM, 8));
        let mut p = vec![0; len];
        r.read_exact(&mut p).await.unwrap();
        assert_eq!(
            parse_control(kind, flags, p).unwrap(),
            Control::RstStream {
                stream_id: 5,
                status: RST_REFUSED_STREAM
            }
        );
        assert_eq!(
            read_head(&mut r).await.unwrap(),
            Some(Head::Data {
                stream_id: 7,
                flags: FLAG_FIN,
                len: 2
            })
        );
    }

    #[tokio::test]
    async fn bad_input_is_an_error() {
        let mut big = control(TYPE_SETTINGS, 0, &[]);
        big[5] = 0xff;
        assert!(matches!(
            read_head(&mut &big[..]).await,
            Err(FrameError::TooLarge(_))
        ));
        let mut v2 = encode_ping(1);
        v2[1] = 2;
        assert!(matches!(
            read_head(&mut &v2[..]).await,
            Err(FrameError::Version(2))
        ));
        assert!(parse_control(TYPE_RST_STREAM, 0, vec![0, 0]).is_err());
        assert!(parse_control(TYPE_SYN_STREAM, 0, vec![0; 6]).is_err());
        assert!(read_head(&mut &[0x80u8, 3][..]).await.is_err());
    }
}
