//! Frames: a u32 big-endian payload length, then one postcard-encoded [`Message`].
//!
//! Owns the byte layout of a stream and the frame size limit. Pure code apart from
//! [`read_frame`] and [`write_frame`], which only move bytes. It must never allocate the size a
//! peer claims before checking it against the limit, never accept a payload with bytes left
//! over, and never panic on any input.
//!
//! ```text
//! +----------------+---------------------------------------+
//! | len: u32 BE    | payload: postcard(Message), len bytes  |
//! +----------------+---------------------------------------+
//! ```
//!
//! Postcard itself does not pre-allocate from a claimed sequence length: with a slice input its
//! size hint is dropped when the claim exceeds the bytes left, and serde caps every
//! pre-allocation at 1 MiB anyway (`tests/fuzz_corpus.rs` measures it). What stays is the ratio
//! of decoded to encoded size (at most ~16x, for a Hello full of empty marks), bounded by the
//! frame limit.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Message;

/// Bytes of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Why a frame could not be read. Any of these closes the connection that carried it.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix claims more than the configured limit; nothing of it was read.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The input (or the stream) ends inside a frame.
    #[error("truncated frame: the input ends before the frame does")]
    Truncated,
    /// The payload is not exactly one valid message.
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("frame stream: {0}")]
    Io(#[from] std::io::Error),
}

/// The whole frame for `msg`: length prefix and payload.
///
/// # Panics
///
/// If the payload exceeds `u32::MAX` bytes, which no message within any sane limit does.
pub fn encode_frame(msg: &Message) -> Vec<u8> {
    let mut out = postcard::to_extend(msg, vec![0u8; FRAME_HEADER_BYTES])
        .expect("postcard encodes every Message into a Vec");
    let len = u32::try_from(out.len() - FRAME_HEADER_BYTES)
        .expect("a message payload is smaller than 4 GiB");
    out[..FRAME_HEADER_BYTES].copy_from_slice(&len.to_be_bytes());
    out
}

/// Decodes one payload that must hold exactly one message. Trailing bytes are refused:
/// a frame means one thing only.
pub fn decode_message(payload: &[u8]) -> Result<Message, FrameError> {
    let (msg, rest) = postcard::take_from_bytes::<Message>(payload)
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Decode(format!(
            "{} bytes left over after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

/// The payload length a header announces.
fn header_len(header: [u8; FRAME_HEADER_BYTES]) -> usize {
    // A u32 always fits a usize on the platforms we build for (32 and 64 bit).
    u32::from_be_bytes(header) as usize
}

/// Decodes the first frame of `buf`, returning the message and the bytes it took.
///
/// `Truncated` means more bytes are needed. `TooLarge` is returned as soon as the header is
/// there, without waiting for (or looking at) the payload.
pub fn decode_frame(buf: &[u8], max: usize) -> Result<(Message, usize), FrameError> {
    let Some((header, rest)) = buf.split_first_chunk::<FRAME_HEADER_BYTES>() else {
        return Err(FrameError::Truncated);
    };
    let len = header_len(*header);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let payload = rest.get(..len).ok_or(FrameError::Truncated)?;
    Ok((decode_message(payload)?, FRAME_HEADER_BYTES + len))
}

/// Reads one frame. `Ok(None)` when the stream ends cleanly between frames; a stream that
/// ends anywhere inside a frame (header included) is `Truncated`. The limit is checked before
/// the payload buffer (of exactly the announced length) is allocated.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Message>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    let mut got = 0;
    while got < FRAME_HEADER_BYTES {
        match r.read(&mut header[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(FrameError::Truncated),
            n => got += n,
        }
    }
    let len = header_len(header);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    decode_message(&payload).map(Some)
}

/// Writes one whole frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
) -> Result<(), FrameError> {
    w.write_all(&encode_frame(msg)).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::NodeId;
    use crate::limits::FRAME_BYTES_MAX_DEFAULT;
    use crate::wire::Goodbye;

    fn goodbye(code: u32) -> Message {
        Message::Goodbye(Goodbye {
            code,
            reason: format!("reason {code}"),
        })
    }

    fn ack(upto: u64) -> Message {
        Message::Ack { epoch: 7, upto }
    }

    #[test]
    fn wire_frame_layout_is_length_then_payload() {
        let f = encode_frame(&ack(300));
        let payload = postcard::to_stdvec(&ack(300)).unwrap();
        assert_eq!(&f[..4], &(payload.len() as u32).to_be_bytes());
        assert_eq!(&f[4..], &payload[..]);
        assert_eq!(decode_frame(&f, 64).unwrap(), (ack(300), f.len()));
    }

    #[test]
    fn wire_decode_frame_takes_only_the_first_frame() {
        let mut buf = encode_frame(&ack(1));
        let first = buf.len();
        buf.extend(encode_frame(&goodbye(2)));
        let (m, used) = decode_frame(&buf, FRAME_BYTES_MAX_DEFAULT).unwrap();
        assert_eq!((m, used), (ack(1), first));
        let (m, used) = decode_frame(&buf[first..], FRAME_BYTES_MAX_DEFAULT).unwrap();
        assert_eq!((m, first + used), (goodbye(2), buf.len()));
    }

    #[test]
    fn wire_too_large_is_refused_from_the_header_alone() {
        let header = u32::MAX.to_be_bytes();
        match decode_frame(&header, FRAME_BYTES_MAX_DEFAULT) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!((len, max), (u32::MAX as usize, FRAME_BYTES_MAX_DEFAULT))
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // The limit is inclusive.
        let f = encode_frame(&ack(1));
        let len = f.len() - 4;
        assert!(decode_frame(&f, len).is_ok());
        assert!(matches!(
            decode_frame(&f, len - 1),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn wire_empty_and_junk_payloads_are_decode_errors() {
        assert!(matches!(
            decode_frame(&[0, 0, 0, 0], 16),
            Err(FrameError::Decode(_))
        ));
        // Variant index far past the last variant.
        assert!(matches!(
            decode_frame(&[0, 0, 0, 1, 0x7f], 16),
            Err(FrameError::Decode(_))
        ));
        let mut payload = postcard::to_stdvec(&ack(5)).unwrap();
        payload.push(0);
        let e = decode_message(&payload).unwrap_err();
        assert_eq!(
            e.to_string(),
            "malformed message: 1 bytes left over after the message"
        );
    }

    #[test]
    fn wire_error_messages_are_clear() {
        let e = FrameError::TooLarge { len: 10, max: 5 };
        assert_eq!(
            e.to_string(),
            "frame of 10 bytes exceeds the limit of 5 bytes"
        );
        assert!(FrameError::Truncated.to_string().contains("truncated"));
    }

    #[tokio::test]
    async fn wire_stream_round_trips_several_frames_then_clean_eof() {
        let msgs = vec![
            ack(1),
            goodbye(9),
            Message::CatchUpRequest(crate::wire::CatchUpRequest {
                origin: NodeId(42),
                after_oseq: 10,
                max: 100,
            }),
            ack(u64::MAX),
        ];
        // A small pipe, so frames cross it in pieces.
        let (mut a, mut b) = tokio::io::duplex(7);
        let sent = msgs.clone();
        let writer = tokio::spawn(async move {
            for m in &sent {
                write_frame(&mut a, m).await.unwrap();
            }
            // Dropping `a` ends the stream cleanly.
        });
        let mut got = Vec::new();
        while let Some(m) = read_frame(&mut b, FRAME_BYTES_MAX_DEFAULT).await.unwrap() {
            got.push(m);
        }
        writer.await.unwrap();
        assert_eq!(got, msgs);
        // And it stays ended.
        assert!(read_frame(&mut b, FRAME_BYTES_MAX_DEFAULT)
            .await
            .unwrap()
            .is_none());
    }

    async fn read_from_bytes(bytes: Vec<u8>, max: usize) -> Result<Option<Message>, FrameError> {
        let (mut a, mut b) = tokio::io::duplex(bytes.len().max(1));
        a.write_all(&bytes).await.unwrap();
        drop(a);
        read_frame(&mut b, max).await
    }

    #[tokio::test]
    async fn wire_stream_eof_inside_a_frame_is_truncated() {
        let f = encode_frame(&goodbye(3));
        for cut in 1..f.len() {
            let r = read_from_bytes(f[..cut].to_vec(), FRAME_BYTES_MAX_DEFAULT).await;
            assert!(
                matches!(r, Err(FrameError::Truncated)),
                "cut at {cut}: {r:?}"
            );
        }
        assert!(read_from_bytes(Vec::new(), FRAME_BYTES_MAX_DEFAULT)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn wire_stream_oversized_length_is_refused_without_reading_on() {
        let (mut a, mut b) = tokio::io::duplex(64);
        // A header claiming 4 GiB, then bytes the reader must leave alone.
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        a.write_all(b"after").await.unwrap();
        let r = read_frame(&mut b, FRAME_BYTES_MAX_DEFAULT).await;
        assert!(
            matches!(r, Err(FrameError::TooLarge { len, .. }) if len == u32::MAX as usize),
            "{r:?}"
        );
        let mut next = [0u8; 5];
        b.read_exact(&mut next).await.unwrap();
        assert_eq!(&next, b"after");
    }

    #[tokio::test]
    async fn wire_stream_trailing_junk_in_payload_is_a_decode_error() {
        let mut payload = postcard::to_stdvec(&ack(5)).unwrap();
        payload.extend_from_slice(b"junk");
        let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
        bytes.extend(payload);
        let r = read_from_bytes(bytes, FRAME_BYTES_MAX_DEFAULT).await;
        assert!(matches!(r, Err(FrameError::Decode(_))), "{r:?}");
    }
}
