//! Reading lines from a child's pipe without trusting it: a line longer than the limit is reported and skipped.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// One read from a pipe.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line, without its newline.
    Full(Vec<u8>),
    /// A line longer than the limit; its first `limit` bytes, and how long it was in all.
    TooLong { head: Vec<u8>, len: usize },
}

/// Reads the next line, holding at most `limit` bytes of it in memory. `None` at end of file.
pub async fn next_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> std::io::Result<Option<Line>> {
    let mut line = Vec::new();
    let mut len = 0usize;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(match (len, len > limit) {
                (0, _) => None,
                (_, true) => Some(Line::TooLong { head: line, len }),
                (_, false) => Some(Line::Full(line)),
            });
        }
        let (chunk, found) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i)),
            None => (buf, None),
        };
        let room = limit.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        len += chunk.len();
        let consumed = found.map(|i| i + 1).unwrap_or(buf.len());
        reader.consume(consumed);
        if found.is_some() {
            return Ok(Some(if len > limit {
                Line::TooLong { head: line, len }
            } else {
                Line::Full(line)
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn splits_and_bounds_lines() {
        let data = b"short\nthis line is too long\n\nlast".to_vec();
        let mut r = tokio::io::BufReader::with_capacity(4, &data[..]);
        assert_eq!(
            next_line(&mut r, 8).await.unwrap(),
            Some(Line::Full(b"short".to_vec()))
        );
        assert_eq!(
            next_line(&mut r, 8).await.unwrap(),
            Some(Line::TooLong {
                head: b"this lin".to_vec(),
                len: 21
            })
        );
        assert_eq!(
            next_line(&mut r, 8).await.unwrap(),
            Some(Line::Full(vec![]))
        );
        assert_eq!(
            next_line(&mut r, 8).await.unwrap(),
            Some(Line::Full(b"last".to_vec()))
        );
        assert_eq!(next_line(&mut r, 8).await.unwrap(), None);
    }
}
