//! Reading request and response bodies with a hard size limit.

use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Bytes};

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
