//! Framed reads and writes on tokio streams.

use std::time::Duration;

use freehint_wire::{FrameHeader, Kind, Message, HEADER_BYTES};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::MigrateError;

/// Reads a frame header; `Ok(None)` on a clean end of stream before it.
pub(crate) async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    context: &str,
) -> Result<Option<FrameHeader>, MigrateError> {
    let mut b = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        let n = r
            .read(&mut b[got..])
            .await
            .map_err(MigrateError::io(context.to_string()))?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(MigrateError::Unexpected(format!(
                "{context}: peer disconnected in the middle of a frame header"
            )));
        }
        got += n;
    }
    FrameHeader::decode(&b)
        .map(Some)
        .map_err(MigrateError::protocol(context.to_string()))
}

/// Reads exactly `buf.len()` bytes; a short stream is a clear error.
pub(crate) async fn read_exact<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    context: &str,
) -> Result<(), MigrateError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(MigrateError::Unexpected(
            format!("{context}: peer disconnected in the middle of a frame (truncated frame)"),
        )),
        Err(e) => Err(MigrateError::io(context.to_string())(e)),
    }
}

/// Reads one whole non-batch message; `Ok(None)` on a clean end of stream.
pub(crate) async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    context: &str,
) -> Result<Option<Message>, MigrateError> {
    let Some(h) = read_header(r, context).await? else {
        return Ok(None);
    };
    if h.kind == Kind::PageBatch {
        return Err(MigrateError::Unexpected(format!(
            "{context}: page data on a channel that does not carry it"
        )));
    }
    let mut payload = vec![0u8; h.payload_bytes as usize];
    read_exact(r, &mut payload, context).await?;
    Message::decode(h.kind, &payload)
        .map(Some)
        .map_err(MigrateError::protocol(context.to_string()))
}

/// Like [`read_message`], but a timeout or end of stream is an error.
pub(crate) async fn expect_message<R: AsyncRead + Unpin>(
    r: &mut R,
    context: &str,
    timeout: Duration,
) -> Result<Message, MigrateError> {
    match tokio::time::timeout(timeout, read_message(r, context)).await {
        Err(_) => Err(MigrateError::Timeout {
            what: context.to_string(),
            seconds: timeout.as_secs(),
        }),
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(MigrateError::Unexpected(format!(
            "{context}: peer closed the connection"
        ))),
        Ok(Err(e)) => Err(e),
    }
}

/// Writes one message.
pub(crate) async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    m: &Message,
    context: &str,
) -> Result<u64, MigrateError> {
    let mut b = Vec::new();
    m.encode(&mut b);
    w.write_all(&b)
        .await
        .map_err(MigrateError::io(context.to_string()))?;
    Ok(b.len() as u64)
}
