//! The conversation routes other than membership: send a message, list
//! the caller's conversations, page a conversation's events.

use crate::commit::{ReplyTo, SendRequest};
use crate::request::{check_body, fields, limit_param, parse_i64_param, read_json};
use crate::respond::{
    error_response, fail, invalid, json_response, retry_response, store_error_response, Body,
};
use crate::store::{self, NewMessage, StoreError};
use crate::App;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tether_protocol::frames::validate_client_msg_id;

/// `POST /v1/conversations/{id}/messages`: other fields are ignored.
#[derive(serde::Deserialize)]
struct SendBody {
    body: String,
    #[serde(default)]
    client_msg_id: Option<String>,
}

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
    let SendBody {
        body: text,
        client_msg_id,
    } = match fields(body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err((code, msg)) = check_body(&app, &text) {
        return fail(code, &msg);
    }
    let client_msg_id = match client_msg_id {
        Some(id) => {
            if let Err(m) = validate_client_msg_id(&id) {
                return invalid(m);
            }
            id
        }
        // Without a key the send is not idempotent; give it a unique one.
        None => {
            let mut b = [0u8; 16];
            if getrandom::fill(&mut b).is_err() {
                return store_error_response(&StoreError::Internal("no randomness".into()));
            }
            format!(
                "srv-{}",
                b.iter().map(|x| format!("{x:02x}")).collect::<String>()
            )
        }
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

/// `GET /v1/conversations/{id}/presence`: every member's status, last
/// seen and read position (members only; 404 otherwise, as everywhere).
pub async fn presence(app: Arc<App>, user: Arc<str>, conversation_id: i64) -> Response<Body> {
    let u = user.to_string();
    match app
        .db(move |c| store::presence::of_conversation(c, conversation_id, &u))
        .await
    {
        Ok(members) => json_response(StatusCode::OK, json!({ "members": members }).to_string()),
        Err(e) => store_error_response(&e),
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
    // Membership, the history floor and how far the log goes: on the
    // primary. The page itself: wherever it is complete (a replica that
    // has reached the last seq, else the primary).
    let u = user.to_string();
    let (floor, last) = match app
        .db(move |c| store::page_bounds(c, conversation_id, &u))
        .await
    {
        Ok(b) => b,
        Err(e) => return store_error_response(&e),
    };
    match app
        .db_history(conversation_id, last, move |c| {
            store::page_events(c, conversation_id, floor, before, after, limit)
        })
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

/// `POST /v1/conversations/{id}/cursor`: other fields are ignored.
#[derive(serde::Deserialize)]
struct CursorBody {
    seq: i64,
}

/// Moves the caller's cursor forward to `seq`, at once (an HTTP client's
/// ack; the SDKs coalesce them): 200 `{"conversation_id","cursor"}` with
/// the cursor as it now is (a seq at or below it changes nothing), 422
/// `invalid_seq` past the last seq, 404 for a non-member.
pub async fn move_cursor(
    app: Arc<App>,
    user: Arc<str>,
    conversation_id: i64,
    req: Request<Incoming>,
) -> Response<Body> {
    let body = match read_json(&app, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let CursorBody { seq } = match fields(body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if seq < 0 {
        return invalid("seq must be a non-negative integer");
    }
    let who = user.to_string();
    match app
        .db_write(move |c| store::move_cursor(c, conversation_id, &who, seq))
        .await
    {
        Ok(store::CursorMove::At(cursor)) => {
            app.cursors.receipt(conversation_id, &user, cursor);
            json_response(
                StatusCode::OK,
                json!({"conversation_id": conversation_id, "cursor": cursor}).to_string(),
            )
        }
        Ok(store::CursorMove::BeyondLast(last)) => fail(
            tether_protocol::error_code::ErrorCode::InvalidSeq,
            &format!("seq {seq} is beyond the last seq {last}"),
        ),
        Err(e) => store_error_response(&e),
    }
}

/// `POST /v1/conversations/{id}/typing`: the caller is typing (an HTTP
/// client's `typing` frame: SSE clients send this way). 202 when relayed
/// or dropped by the once-per-2-s limit alike (typing is ephemeral), 404
/// for a non-member.
pub async fn typing(app: Arc<App>, user: Arc<str>, conversation_id: i64) -> Response<Body> {
    let u = user.to_string();
    match app
        .db(move |c| store::is_member(c, conversation_id, &u))
        .await
    {
        Ok(true) => {
            app.signals.typing(&user, conversation_id);
            json_response(
                StatusCode::ACCEPTED,
                json!({ "conversation_id": conversation_id }).to_string(),
            )
        }
        Ok(false) => store_error_response(&StoreError::NotFound(conversation_id)),
        Err(e) => store_error_response(&e),
    }
}
