//! The HTTP API with typed answers, over one HTTP client: hyper 1 and
//! hyper-util's pooled client (keep-alive; `https://` with the `tls`
//! feature, through rustls). Path segments and query values are
//! percent-encoded here, never by the caller.

use crate::transport::{self, Endpoints};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as Pool;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;
use tether_protocol::frames::Event;

/// What stays unencoded in a path segment or a query value (RFC 3986
/// unreserved characters).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `s` percent-encoded as one path segment or query value.
pub fn encode(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

#[cfg(feature = "tls")]
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
#[cfg(not(feature = "tls"))]
type Connector = HttpConnector;

fn pool(connector: Connector) -> Pool<Connector, Full<Bytes>> {
    Pool::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

fn plain() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http
}

/// `https://` through rustls (with `config`, or the webpki roots), and
/// `http://`.
#[cfg(feature = "tls")]
fn connector(config: Option<std::sync::Arc<rustls::ClientConfig>>) -> Connector {
    let mut http = plain();
    http.enforce_http(false);
    let config = config.unwrap_or_else(transport::tls_config);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*config).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

#[cfg(not(feature = "tls"))]
fn connector() -> Connector {
    plain()
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestError {
    /// The base URL cannot work (scheme, host, or `https://` without the
    /// `tls` feature).
    Config(String),
    /// No connection: `kind` is the socket's error (`ConnectionRefused`...).
    Connect {
        kind: std::io::ErrorKind,
        message: String,
    },
    /// Writing, reading or parsing failed (or the request timed out).
    Io(String),
    /// The server answered with an error status and `{"error","message"}`.
    Http {
        status: u16,
        code: String,
        message: String,
        /// Seconds (429, 503).
        retry_after: Option<u64>,
    },
}

impl std::fmt::Display for RestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestError::Config(e) => write!(f, "bad configuration: {e}"),
            RestError::Connect { message, .. } => write!(f, "could not connect: {message}"),
            RestError::Io(e) => write!(f, "HTTP request failed: {e}"),
            RestError::Http {
                status,
                code,
                message,
                ..
            } => write!(f, "HTTP {status} {code}: {message}"),
        }
    }
}

impl std::error::Error for RestError {}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Result<Value, RestError> {
        self.parse()
    }

    /// The body as `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, RestError> {
        serde_json::from_str(&self.body)
            .map_err(|e| RestError::Io(format!("unexpected response ({e}): {:.200}", self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `Ok(self)` for 2xx, else the contract's error.
    pub fn ok(self) -> Result<Response, RestError> {
        if (200..300).contains(&self.status) {
            return Ok(self);
        }
        let v: Value = serde_json::from_str(&self.body).unwrap_or(Value::Null);
        let retry_after = self
            .header("retry-after")
            .and_then(|s| s.parse().ok())
            .or_else(|| v["retry_after"].as_u64());
        Err(RestError::Http {
            status: self.status,
            code: v["error"].as_str().unwrap_or("unknown").to_string(),
            message: v["message"].as_str().unwrap_or(&self.body).to_string(),
            retry_after,
        })
    }
}

/// `POST /v1/conversations`: the new conversation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Conversation {
    pub id: i64,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub members: Vec<String>,
    /// The seq of its `conversation.created` (1).
    #[serde(default)]
    pub seq: i64,
    /// `since_join` or `shared`.
    #[serde(default)]
    pub history: String,
}

/// One row of `GET /v1/conversations`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ConversationRow {
    pub id: i64,
    #[serde(default)]
    pub title: String,
    pub last_seq: i64,
    /// The highest seq this user acknowledged.
    pub cursor: i64,
    pub unread: i64,
    /// `owner`, `admin` or `member`.
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub history: String,
}

/// A page of `GET /v1/conversations` (ordered by id).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ConversationsPage {
    pub conversations: Vec<ConversationRow>,
    /// Pass as `after` for the next page; `None` on the last.
    pub next: Option<String>,
}

/// `POST /v1/conversations/{id}/members`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MemberAdded {
    /// False when the user was a member already (nothing written).
    pub added: bool,
    #[serde(default)]
    pub role: Option<String>,
    /// The seq of the `member.joined` (when added).
    #[serde(default)]
    pub seq: Option<i64>,
}

/// `PATCH /v1/conversations/{id}/members/{user}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RoleChanged {
    pub role: String,
    pub changed: bool,
    #[serde(default)]
    pub seq: Option<i64>,
}

/// `DELETE /v1/conversations/{id}/members/{user}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MemberRemoved {
    pub removed: bool,
    #[serde(default)]
    pub seq: Option<i64>,
    /// The successor, when the owner left.
    #[serde(default)]
    pub new_owner: Option<String>,
}

/// Which way to page through a conversation's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// Newest first, below `Some(seq)` (from the newest with `None`).
    Before(Option<i64>),
    /// Oldest first, above `seq` (`After(0)`: from the start).
    After(i64),
}

/// One member in `GET /v1/conversations/{id}/presence`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MemberPresence {
    pub user: String,
    /// `online` or `offline`.
    pub status: String,
    /// RFC 3339; `None` for a user never seen.
    #[serde(default)]
    pub last_seen: Option<String>,
    /// The highest seq they have read (their cursor).
    pub read_seq: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PresencePage {
    pub members: Vec<MemberPresence>,
}

/// A page of a conversation's events, in the order of its [`Page`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EventsPage {
    pub events: Vec<Event>,
    /// Backward paging: pass as `Page::Before(Some(_))` next; `None` at the
    /// start of what this user may see.
    #[serde(default)]
    pub next_before_seq: Option<i64>,
    /// Forward paging: pass as `Page::After(_)` next; `None` at the end.
    #[serde(default)]
    pub next_after_seq: Option<i64>,
}

/// The REST API of one user. Cheap to clone; clones share the connection
/// pool.
#[derive(Clone)]
pub struct Rest {
    /// `http[s]://host:port[/prefix]`, or why there is none.
    base: Result<String, String>,
    token: String,
    pool: Pool<Connector, Full<Bytes>>,
    pub timeout: Duration,
}

impl std::fmt::Debug for Rest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Rest").field("base", &self.base).finish()
    }
}

impl Rest {
    /// `base_url`: `http://host:port` (`https://` with the `tls` feature;
    /// `ws[s]://` and a trailing `/v1/ws` are accepted too, so the
    /// WebSocket URL works here). A bad URL makes every request fail with
    /// [`RestError::Config`].
    pub fn new(base_url: &str, token: impl Into<String>) -> Rest {
        let base = transport::endpoints(base_url).map(|Endpoints { http, .. }| http);
        Rest {
            base,
            token: token.into(),
            #[cfg(feature = "tls")]
            pool: pool(connector(None)),
            #[cfg(not(feature = "tls"))]
            pool: pool(connector()),
            timeout: Duration::from_secs(30),
        }
    }

    /// The same, trusting what `config` trusts for `https://` (e.g. a
    /// private CA) instead of the webpki roots.
    #[cfg(feature = "tls")]
    pub fn with_tls(self, config: std::sync::Arc<rustls::ClientConfig>) -> Rest {
        Rest {
            pool: pool(connector(Some(config))),
            ..self
        }
    }

    /// The same server (and connection pool) as another user.
    pub fn with_token(&self, token: impl Into<String>) -> Rest {
        Rest {
            token: token.into(),
            ..self.clone()
        }
    }

    /// `METHOD PATH` with the bearer token (if not empty) and an optional
    /// JSON body, whatever the status.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Response, RestError> {
        let body = body.map(|b| ("application/json", b.to_string().into_bytes()));
        self.send(method, path, body).await
    }

    /// The general form: any body bytes with their content type (e.g.
    /// malformed JSON in a test).
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Response, RestError> {
        let base = self
            .base
            .as_ref()
            .map_err(|e| RestError::Config(e.clone()))?;
        let what = || format!("{method} {path}");
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{base}{path}"));
        if !self.token.is_empty() {
            let mut auth = HeaderValue::from_str(&format!("Bearer {}", self.token))
                .map_err(|_| RestError::Config("the token is not a valid header value".into()))?;
            auth.set_sensitive(true);
            req = req.header(AUTHORIZATION, auth);
        }
        let bytes = match body {
            Some((ct, b)) => {
                req = req.header(CONTENT_TYPE, ct);
                Bytes::from(b)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| RestError::Config(format!("{}: {e}", what())))?;
        let exchange = async {
            let resp = self.pool.request(req).await.map_err(|e| {
                use std::error::Error;
                let cause = e.source().map(|s| format!(": {s}")).unwrap_or_default();
                let message = format!("{}: {e}{cause}", what());
                if !e.is_connect() {
                    return RestError::Io(message);
                }
                // The socket's own error, if it is in the chain.
                let mut source = e.source();
                let mut kind = std::io::ErrorKind::Other;
                while let Some(s) = source {
                    if let Some(io) = s.downcast_ref::<std::io::Error>() {
                        kind = io.kind();
                        break;
                    }
                    source = s.source();
                }
                RestError::Connect { kind, message }
            })?;
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .map(|(k, v)| {
                    let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    (k.as_str().to_string(), v)
                })
                .collect();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| RestError::Io(format!("{}: {e}", what())))?
                .to_bytes();
            Ok::<_, RestError>(Response {
                status,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Err(RestError::Io(format!("{}: timed out", what()))),
            Ok(r) => r,
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, RestError> {
        self.request(method, path, body).await?.ok()?.parse()
    }

    /// `POST /v1/conversations` (`history`: `since_join`, the default).
    pub async fn create_conversation<S: AsRef<str>>(
        &self,
        members: &[S],
        title: &str,
    ) -> Result<Conversation, RestError> {
        self.create_conversation_with(members, title, None).await
    }

    /// `POST /v1/conversations` with a `history` (`since_join` or `shared`).
    pub async fn create_conversation_with<S: AsRef<str>>(
        &self,
        members: &[S],
        title: &str,
        history: Option<&str>,
    ) -> Result<Conversation, RestError> {
        let members: Vec<&str> = members.iter().map(AsRef::as_ref).collect();
        let mut body = json!({"members": members, "title": title});
        if let Some(h) = history {
            body["history"] = h.into();
        }
        self.call("POST", "/v1/conversations", Some(&body)).await
    }

    /// `POST /v1/conversations/{id}/members` (`role`: `member` by default,
    /// or `admin`, which only the owner may give).
    pub async fn add_member(
        &self,
        conversation_id: i64,
        user: &str,
        role: Option<&str>,
    ) -> Result<MemberAdded, RestError> {
        let path = format!("/v1/conversations/{conversation_id}/members");
        let mut body = json!({"user": user});
        if let Some(r) = role {
            body["role"] = r.into();
        }
        self.call("POST", &path, Some(&body)).await
    }

    /// `PATCH /v1/conversations/{id}/members/{user}` (owner only).
    pub async fn set_role(
        &self,
        conversation_id: i64,
        user: &str,
        role: &str,
    ) -> Result<RoleChanged, RestError> {
        let path = format!(
            "/v1/conversations/{conversation_id}/members/{}",
            encode(user)
        );
        self.call("PATCH", &path, Some(&json!({"role": role})))
            .await
    }

    /// `DELETE /v1/conversations/{id}/members/{user}`.
    pub async fn remove_member(
        &self,
        conversation_id: i64,
        user: &str,
    ) -> Result<MemberRemoved, RestError> {
        let path = format!(
            "/v1/conversations/{conversation_id}/members/{}",
            encode(user)
        );
        self.call("DELETE", &path, None).await
    }

    /// `POST /v1/conversations/{id}/messages`: the stored event, and whether
    /// it was a repeat of an earlier `client_msg_id` (200 instead of 201).
    pub async fn send_message(
        &self,
        conversation_id: i64,
        body: &str,
        client_msg_id: Option<&str>,
    ) -> Result<(Event, bool), RestError> {
        let path = format!("/v1/conversations/{conversation_id}/messages");
        let mut req = json!({"body": body});
        if let Some(id) = client_msg_id {
            req["client_msg_id"] = id.into();
        }
        let r = self.request("POST", &path, Some(&req)).await?.ok()?;
        Ok((r.parse()?, r.status == 200))
    }

    /// `GET /v1/conversations?after=&limit=`.
    pub async fn list_conversations(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<ConversationsPage, RestError> {
        let mut path = format!("/v1/conversations?limit={limit}");
        if let Some(a) = after {
            path.push_str(&format!("&after={}", encode(a)));
        }
        self.call("GET", &path, None).await
    }

    /// `GET /v1/conversations/{id}/events`, in either direction.
    pub async fn events(
        &self,
        conversation_id: i64,
        page: Page,
        limit: u32,
    ) -> Result<EventsPage, RestError> {
        let mut path = format!("/v1/conversations/{conversation_id}/events?limit={limit}");
        match page {
            Page::Before(Some(b)) => path.push_str(&format!("&before_seq={b}")),
            Page::Before(None) => {}
            Page::After(a) => path.push_str(&format!("&after_seq={a}")),
        }
        self.call("GET", &path, None).await
    }

    /// Backward paging (newest first): `events(id, Page::Before(before_seq), limit)`.
    pub async fn events_page(
        &self,
        conversation_id: i64,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<EventsPage, RestError> {
        self.events(conversation_id, Page::Before(before_seq), limit)
            .await
    }

    /// Every member's presence and read position (members only).
    pub async fn presence(&self, conversation_id: i64) -> Result<PresencePage, RestError> {
        self.call(
            "GET",
            &format!("/v1/conversations/{conversation_id}/presence"),
            None,
        )
        .await
    }

    /// `GET path` without caring about the status (e.g. `/ready`, `/health`).
    pub async fn get(&self, path: &str) -> Result<Response, RestError> {
        self.request("GET", path, None).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_percent_encoded() {
        assert_eq!(encode("alice"), "alice");
        assert_eq!(encode("a b/c?d#e%"), "a%20b%2Fc%3Fd%23e%25");
        assert_eq!(encode("x.y_z-1~"), "x.y_z-1~");
        assert_eq!(encode("é"), "%C3%A9");
    }

    #[test]
    fn error_bodies_become_typed_errors() {
        let r = Response {
            status: 429,
            headers: vec![("retry-after".into(), "2".into())],
            body: r#"{"error":"rate_limited","message":"slow down"}"#.into(),
        };
        assert_eq!(
            r.ok().unwrap_err(),
            RestError::Http {
                status: 429,
                code: "rate_limited".into(),
                message: "slow down".into(),
                retry_after: Some(2)
            }
        );
    }

    #[tokio::test]
    async fn a_bad_base_url_fails_every_request_at_once() {
        let r = Rest::new("ftp://h:1", "t");
        assert!(matches!(r.get("/ready").await, Err(RestError::Config(_))));
    }
}
