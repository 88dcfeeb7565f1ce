//! Responses of the contract: JSON bodies, the error body
//! `{"error":code,"message":...}` with its status, `Retry-After` on 429
//! and 503, and the one mapping of a store error to a response.

use crate::store::{StoreError, StoreFailure};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};
use tether_protocol::error_code::ErrorCode;
use tether_protocol::frames::http_error_body;

pub type Body = Full<Bytes>;

/// A JSON response.
pub fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An error response of the contract.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(status, http_error_body(code, message, None))
}

/// The response for an error code of the contract, with its status.
pub fn fail(code: ErrorCode, message: &str) -> Response<Body> {
    let status =
        StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error_response(status, code.as_str(), message)
}

pub fn retry_response(status: StatusCode, code: &str, message: &str, secs: u64) -> Response<Body> {
    let mut r = json_response(status, http_error_body(code, message, Some(secs)));
    r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    r
}

/// The response for a store error (the mapping is
/// [`StoreFailure`]'s, shared with the WebSocket).
pub fn store_error_response(e: &StoreError) -> Response<Body> {
    if let StoreError::Internal(m) = e {
        log::error!("internal error: {m}");
    }
    let f = StoreFailure::from(e);
    let status =
        StatusCode::from_u16(f.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match f.retry_after {
        Some(secs) => retry_response(status, f.code.as_str(), &f.message, secs),
        None => error_response(status, f.code.as_str(), &f.message),
    }
}

/// 422 `invalid_field`.
pub fn invalid(message: &str) -> Response<Body> {
    error_response(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
}
