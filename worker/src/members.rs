//! The membership routes: create a conversation, add, remove, change a
//! role. Each validates its input, runs one store write (which enforces
//! the roles, see `crate::store::membership`), and after COMMIT
//! hands the new events to this worker's fan-out before answering.

use crate::frame::Frame;
use crate::request::read_json;
use crate::respond::{error_response, invalid, json_response, store_error_response, Body};
use crate::store::{self, History, MembershipChange, NoticeKey, Role, StoreError};
use crate::App;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;
use tether_protocol::auth::valid_user_id;

const USER_ID_RULE: &str = "1-64 chars of [A-Za-z0-9_.@-]";

/// Runs one membership write (which commits and announces to other
/// workers), then hands its events to this worker's fan-out: the one path
/// every membership route takes. The error is the ready response.
async fn commit_and_announce<F>(app: &App, write: F) -> Result<MembershipChange, Response<Body>>
where
    F: FnOnce(&mut postgres::Client, &NoticeKey) -> Result<MembershipChange, StoreError>
        + Send
        + 'static,
{
    let key = app.notice_key.clone();
    let change = app
        .db_write(move |c| write(c, &key))
        .await
        .map_err(|e| store_error_response(&e))?;
    let now = Instant::now();
    app.dispatcher
        .local(
            change
                .events
                .iter()
                .map(|e| Arc::new(Frame::from_event(e, now)))
                .collect(),
        )
        .await;
    Ok(change)
}

/// `"admin"` or `"member"` (absent: member).
fn role_field(body: &serde_json::Map<String, Value>) -> Result<Role, Response<Body>> {
    match body.get("role") {
        None | Some(Value::Null) => Ok(Role::Member),
        Some(Value::String(s)) => match Role::parse(s) {
            Some(r @ (Role::Admin | Role::Member)) => Ok(r),
            _ => Err(invalid("role must be \"admin\" or \"member\"")),
        },
        Some(_) => Err(invalid("role must be \"admin\" or \"member\"")),
    }
}

/// `POST /v1/conversations`.
pub async fn create(app: Arc<App>, user: Arc<str>, req: Request<Incoming>) -> Response<Body> {
    let body = match read_json(&app, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let members: Vec<String> = match body.get("members") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => {
            let mut out = Vec::with_capacity(a.len());
            for m in a {
                match m.as_str() {
                    Some(s) if valid_user_id(s) => out.push(s.to_string()),
                    _ => return invalid(&format!("members must be user ids ({USER_ID_RULE})")),
                }
            }
            out
        }
        Some(_) => return invalid("members must be an array of user ids"),
    };
    if members.len() > store::MAX_INITIAL_MEMBERS {
        return invalid("too many members");
    }
    let max = app.config.max_members;
    if max > 0 && members.iter().filter(|m| m.as_str() != &*user).count() + 1 > max {
        return store_error_response(&StoreError::TooManyMembers(max));
    }
    let title = match body.get("title") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) if s.chars().count() <= 200 && !s.contains('\0') => s.clone(),
        Some(_) => return invalid("title must be a string of at most 200 characters without NUL"),
    };
    let history = match body.get("history") {
        None | Some(Value::Null) => History::default(),
        Some(Value::String(s)) => match History::parse(s) {
            Some(h) => h,
            None => return invalid("history must be \"since_join\" or \"shared\""),
        },
        Some(_) => return invalid("history must be \"since_join\" or \"shared\""),
    };
    let creator = user.to_string();
    let change = match commit_and_announce(&app, move |c, key| {
        store::create_conversation(c, key, &creator, &title, &members, history)
    })
    .await
    {
        Ok(change) => change,
        Err(r) => return r,
    };
    let Some(event) = change.events.first() else {
        return error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", "no event");
    };
    log::info!("user={user} conversation={} created", event.conversation_id);
    let body = json!({
        "id": event.conversation_id,
        "title": event.title,
        "members": event.members,
        "seq": event.seq,
        "history": history.as_str(),
    })
    .to_string();
    json_response(StatusCode::CREATED, body)
}

/// `POST /v1/conversations/{id}/members {"user", "role"?}`.
pub async fn add(
    app: Arc<App>,
    user: Arc<str>,
    conversation_id: i64,
    req: Request<Incoming>,
) -> Response<Body> {
    let body = match read_json(&app, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let member = match body.get("user").and_then(Value::as_str) {
        Some(u) if valid_user_id(u) => u.to_string(),
        _ => return invalid(&format!("user must be a user id ({USER_ID_RULE})")),
    };
    let role = match role_field(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let actor = user.to_string();
    let m = member.clone();
    let max_members = app.config.max_members;
    let change = match commit_and_announce(&app, move |c, key| {
        store::add_member(c, key, &actor, conversation_id, &m, role, max_members)
    })
    .await
    {
        Ok(change) => change,
        Err(r) => return r,
    };
    let Some(joined) = change.events.first() else {
        return json_response(
            StatusCode::OK,
            json!({"conversation_id": conversation_id, "user": member, "added": false}).to_string(),
        );
    };
    log::info!(
        "user={user} conversation={conversation_id} seq={} added {member} as {}",
        joined.seq,
        role.as_str()
    );
    let body = json!({
        "conversation_id": conversation_id,
        "user": member,
        "added": true,
        "role": role.as_str(),
        "seq": joined.seq,
    })
    .to_string();
    json_response(StatusCode::OK, body)
}

/// `DELETE /v1/conversations/{id}/members/{user}`.
pub async fn remove(
    app: Arc<App>,
    user: Arc<str>,
    conversation_id: i64,
    member: String,
) -> Response<Body> {
    if !valid_user_id(&member) {
        return error_response(StatusCode::NOT_FOUND, "not_found", "no such member");
    }
    let actor = user.to_string();
    let m = member.clone();
    let change = match commit_and_announce(&app, move |c, key| {
        store::remove_member(c, key, &actor, conversation_id, &m)
    })
    .await
    {
        Ok(change) => change,
        Err(r) => return r,
    };
    let seq = change.events.first().map(|e| e.seq);
    // When the owner left: who owns it now.
    let owner = change
        .events
        .iter()
        .find(|e| e.role.as_deref() == Some(Role::Owner.as_str()))
        .and_then(|e| e.user.clone());
    log::info!(
        "user={user} conversation={conversation_id} seq={seq:?} removed {member}{}",
        owner
            .as_deref()
            .map(|o| format!("; {o} is now owner"))
            .unwrap_or_default()
    );
    json_response(
        StatusCode::OK,
        json!({
            "conversation_id": conversation_id,
            "user": member,
            "removed": true,
            "seq": seq,
            "new_owner": owner,
        })
        .to_string(),
    )
}

/// `PATCH /v1/conversations/{id}/members/{user} {"role"}`.
pub async fn set_role(
    app: Arc<App>,
    user: Arc<str>,
    conversation_id: i64,
    member: String,
    req: Request<Incoming>,
) -> Response<Body> {
    if !valid_user_id(&member) {
        return error_response(StatusCode::NOT_FOUND, "not_found", "no such member");
    }
    let body = match read_json(&app, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if !body.contains_key("role") {
        return invalid("role is required: \"admin\" or \"member\"");
    }
    let role = match role_field(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let actor = user.to_string();
    let m = member.clone();
    let change = match commit_and_announce(&app, move |c, key| {
        store::set_role(c, key, &actor, conversation_id, &m, role)
    })
    .await
    {
        Ok(change) => change,
        Err(r) => return r,
    };
    let seq = change.events.first().map(|e| e.seq);
    if let Some(seq) = seq {
        log::info!(
            "user={user} conversation={conversation_id} seq={seq} made {member} {}",
            role.as_str()
        );
    }
    json_response(
        StatusCode::OK,
        json!({
            "conversation_id": conversation_id,
            "user": member,
            "role": role.as_str(),
            "changed": seq.is_some(),
            "seq": seq,
        })
        .to_string(),
    )
}
