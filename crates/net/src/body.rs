//! Reading request and response bodies with a hard size limit.

use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Buf, Bytes};

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("body could not be read: {0}")]
    Read(String),
}

/// Reads a whole body, refusing it as soon as it grows past `limit`, so a
/// peer cannot make us buffer more than that.
pub async fn read_limited<B>(body: B, limit: u64) -> Result<Bytes, BodyError>
where
    B: Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                Err(BodyError::TooLarge { limit })
            } else {
                Err(BodyError::Read(e.to_string()))
            }
        }
    }
}

/// Reads and discards up to `max` bytes of a body. A refusal sent before
/// the client finished writing often reaches it only as "connection reset"
/// instead of the clear answer; draining a moderately oversized body first
/// lets the client read the refusal. Returns false if the body was larger
/// than `max` (the connection should then be closed).
pub async fn drain<B>(body: B, max: u64) -> bool
where
    B: Body + Unpin,
{
    let mut body = body;
    let mut seen: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    seen = seen.saturating_add(data.remaining() as u64);
                    if seen > max {
                        return false;
                    }
                }
            }
            Err(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use hyper::body::Frame;

    use super::*;

    /// A body that arrives in chunks with no declared length, as with
    /// `Transfer-Encoding: chunked`.
    struct Chunks {
        left: usize,
        size: usize,
    }

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            self.left -= 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; self.size])))))
        }
    }

    #[tokio::test]
    async fn chunked_bodies_are_cut_at_the_limit() {
        let ok = read_limited(Chunks { left: 4, size: 1000 }, 4000).await.expect("fits");
        assert_eq!(ok.len(), 4000);
        let err = read_limited(Chunks { left: 5, size: 1000 }, 4000).await;
        assert!(matches!(err, Err(BodyError::TooLarge { limit: 4000 })), "{err:?}");
    }

    #[tokio::test]
    async fn drain_stops_past_its_maximum() {
        assert!(drain(Chunks { left: 3, size: 100 }, 300).await);
        assert!(!drain(Chunks { left: 1000, size: 100 }, 300).await);
    }
}
