//! The conversation routes other than membership: send a message, list
//! the caller's conversations, page a conversation's events.

use crate::commit::{ReplyTo, SendRequest};
use crate::request::{check_body, limit_param, parse_i64_param, read_json};
use crate::respond::{
    error_response, fail, invalid, json_response, retry_response, store_error_response, Body,
};
use crate::store::{self, NewMessage, StoreError};
use crate::App;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tether_protocol::frames::validate_client_msg_id;

pub async fn send_message(
    app: Arc<App>,
    user: Arc<str>,
    conversation_id: i64,
    req: Request<Incoming>,
) -> Response<Body> {
    let body = match read_json(&app, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let text = match body.get("body") {
        Some(Value::String(s)) => s.clone(),
        _ => return invalid("body must be a string"),
    };
    if let Err((code, msg)) = check_body(&app, &text) {
        return fail(code, &msg);
    }
    let client_msg_id = match body.get("client_msg_id") {
        Some(Value::String(s)) => {
            if let Err(m) = validate_client_msg_id(s) {
                return invalid(m);
            }
            s.clone()
        }
        // Without a key the send is not idempotent; give it a unique one.
        None | Some(Value::Null) => {
            let mut b = [0u8; 16];
            if getrandom::fill(&mut b).is_err() {
                return store_error_response(&StoreError::Internal("no randomness".into()));
            }
            format!(
                "srv-{}",
                b.iter().map(|x| format!("{x:02x}")).collect::<String>()
            )
        }
        Some(_) => return invalid("client_msg_id must be a string"),
    };
    if let Err(secs) = app.rate.check(&user) {
        app.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
        return retry_response(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many sends; slow down",
            secs,
        );
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let req = SendRequest {
        message: NewMessage {
            conversation_id,
            sender: user.to_string(),
            body: text,
            client_msg_id,
        },
        reply: ReplyTo::Once(tx),
        queued_at: Instant::now(),
    };
    if app.committer.submit(req).await.is_err() {
        return store_error_response(&StoreError::Unavailable("commit lanes stopped".into()));
    }
    match rx.await {
        Ok(Ok(appended)) => {
            let status = if appended.duplicate {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            json_response(status, appended.event.to_json())
        }
        Ok(Err(e)) => store_error_response(&e),
        Err(_) => store_error_response(&StoreError::Unavailable("commit lane stopped".into())),
    }
}

pub async fn list_conversations(
    app: Arc<App>,
    user: Arc<str>,
    query: Option<&str>,
) -> Response<Body> {
    let after = match parse_i64_param(query, "after") {
        Ok(a) => a.unwrap_or(0),
        Err(r) => return r,
    };
    let limit = match limit_param(query) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let u = user.to_string();
    match app
        .db(move |c| store::conversations_page(c, &u, after, limit + 1))
        .await
    {
        Ok(mut rows) => {
            let more = rows.len() as i64 > limit;
            rows.truncate(limit as usize);
            let next = if more {
                rows.last().map(|r| r.id.to_string())
            } else {
                None
            };
            json_response(
                StatusCode::OK,
                json!({"conversations": rows, "next": next}).to_string(),
            )
        }
        Err(e) => store_error_response(&e),
    }
}

pub async fn list_events(
    app: Arc<App>,
    user: Arc<str>,
    conversation_id: i64,
    query: Option<&str>,
) -> Response<Body> {
    let before = match parse_i64_param(query, "before_seq") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let after = match parse_i64_param(query, "after_seq") {
        Ok(v) => v,
        Err(r) => return r,
    };
    if before.is_some() && after.is_some() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "give before_seq or after_seq, not both",
        );
    }
    let limit = match limit_param(query) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let u = user.to_string();
    match app
        .db(move |c| store::events_page(c, &u, conversation_id, before, after, limit))
        .await
    {
        Ok((events, more)) => {
            let last = events.last().map(|e| e.seq);
            let body = if after.is_some() {
                json!({"events": events, "next_after_seq": if more { last } else { None }})
            } else {
                json!({"events": events, "next_before_seq": if more { last } else { None }})
            };
            json_response(StatusCode::OK, body.to_string())
        }
        Err(e) => store_error_response(&e),
    }
}
