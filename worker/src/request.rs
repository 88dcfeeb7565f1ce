//! What a request carries: its token, query parameters, JSON body, and
//! the checks every route shares (body size, message body).

use crate::respond::{error_response, fail, Body};
use crate::App;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::{Request, Response, StatusCode};
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tether_protocol::error_code::ErrorCode;

/// Largest request body read (JSON around a message body of the maximum size).
fn body_limit(app: &App) -> usize {
    app.config.max_body_bytes * 2 + 4096
}

/// Decodes `%XX` and `+` in a query component.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of `name` in a query string.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// The bearer token of a request (header only; `?token=` is accepted on
/// the WebSocket route alone).
pub fn bearer(req: &Request<Incoming>) -> Option<String> {
    let h = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let t = h
        .strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("bearer "))?;
    Some(t.trim().to_string())
}

/// Verifies a token; on failure the 401 response. The token itself is
/// never logged.
pub fn authenticate(app: &App, token: Option<String>) -> Result<Arc<str>, Response<Body>> {
    let token = token.unwrap_or_default();
    match app.verifier.verify(&token) {
        Ok(user) => Ok(Arc::from(user)),
        Err(e) => {
            app.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
            log::debug!("auth refused: {e}");
            let mut r = error_response(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string());
            r.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
            Err(r)
        }
    }
}

/// Reads a JSON object body: 413 past the limit, 400 if not JSON or not
/// an object.
pub async fn read_json(
    app: &App,
    req: Request<Incoming>,
) -> Result<serde_json::Map<String, Value>, Response<Body>> {
    let limit = body_limit(app);
    if let Some(len) = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body too large",
            ));
        }
    }
    // The whole body within the body timeout: a body trickled in holds
    // nothing of ours for longer (408, and the connection is closed).
    let collected = tokio::time::timeout(
        app.config.body_timeout,
        Limited::new(req.into_body(), limit).collect(),
    )
    .await;
    let Ok(collected) = collected else {
        let mut r = fail(
            ErrorCode::RequestTimeout,
            "the request body did not arrive in time",
        );
        r.headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        return Err(r);
    };
    let bytes = match collected {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return Err(error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "request body too large",
                ));
            }
            return Err(error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "could not read the request body",
            ));
        }
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body must be a JSON object",
        )),
        Err(e) => Err(error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("malformed JSON: {e}"),
        )),
    }
}

pub fn parse_i64_param(query: Option<&str>, name: &str) -> Result<Option<i64>, Response<Body>> {
    match query_param(query, name) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n >= 0 => Ok(Some(n)),
            _ => Err(error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("{name} must be a non-negative integer"),
            )),
        },
    }
}

pub fn limit_param(query: Option<&str>) -> Result<i64, Response<Body>> {
    Ok(parse_i64_param(query, "limit")?.unwrap_or(50).clamp(1, 200))
}

/// A JSON body's fields as `T` (a serde struct of the route): a missing
/// field or one of the wrong type is 422 `invalid_field`, naming it.
pub fn fields<T: serde::de::DeserializeOwned>(
    body: serde_json::Map<String, Value>,
) -> Result<T, Response<Body>> {
    serde_json::from_value(Value::Object(body))
        .map_err(|e| crate::respond::invalid(&format!("invalid field: {e}")))
}

/// Validates a message body (no NUL, within the size limit): `Err` is
/// the code and message.
pub fn check_body(app: &App, body: &str) -> Result<(), (ErrorCode, String)> {
    if body.contains('\0') {
        return Err((
            ErrorCode::InvalidField,
            "message body must not contain NUL characters".into(),
        ));
    }
    if body.len() > app.config.max_body_bytes {
        return Err((
            ErrorCode::PayloadTooLarge,
            format!(
                "message body is {} bytes; the limit is {}",
                body.len(),
                app.config.max_body_bytes
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing_decodes() {
        assert_eq!(
            query_param(Some("a=1&token=x%2Ey+z"), "token").as_deref(),
            Some("x.y z")
        );
        assert_eq!(query_param(Some("a=1"), "b"), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%41"), "A");
    }
}
