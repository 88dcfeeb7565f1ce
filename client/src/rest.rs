//! The HTTP API over a minimal HTTP/1.1 client (one connection per
//! request, `Connection: close`; plain `http://` only).

use crate::EventFrame;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestError {
    /// Connecting, writing, reading or parsing failed.
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
        serde_json::from_str(&self.body)
            .map_err(|e| RestError::Io(format!("response is not JSON ({e}): {:.200}", self.body)))
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

/// A page of a conversation's events (newest first with `before_seq`).
#[derive(Debug, Clone)]
pub struct EventsPage {
    pub events: Vec<EventFrame>,
    /// Pass as `before_seq` for the next (older) page.
    pub next_before_seq: Option<i64>,
}

/// The REST API of one user.
#[derive(Debug, Clone)]
pub struct Rest {
    /// `host:port`
    authority: String,
    token: String,
    pub timeout: Duration,
}

impl Rest {
    /// `base_url`: `http://host:port` (a path after it is ignored).
    pub fn new(base_url: &str, token: impl Into<String>) -> Rest {
        let rest = base_url
            .strip_prefix("http://")
            .or_else(|| base_url.strip_prefix("ws://"))
            .unwrap_or(base_url);
        let authority = rest.split('/').next().unwrap_or(rest).to_string();
        Rest {
            authority,
            token: token.into(),
            timeout: Duration::from_secs(30),
        }
    }

    /// The same server as another user.
    pub fn with_token(&self, token: impl Into<String>) -> Rest {
        Rest {
            authority: self.authority.clone(),
            token: token.into(),
            timeout: self.timeout,
        }
    }

    /// `METHOD PATH` with the bearer token and an optional JSON body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Response, RestError> {
        let body = body.map(|b| b.to_string());
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAuthorization: Bearer {}\r\n",
            self.authority, self.token
        );
        match &body {
            Some(b) => req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )),
            None if method == "GET" => req.push_str("\r\n"),
            None => req.push_str("Content-Length: 0\r\n\r\n"),
        }
        let exchange = async {
            let mut stream = TcpStream::connect(&self.authority).await?;
            stream.write_all(req.as_bytes()).await?;
            let mut buf = Vec::new();
            stream.read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        let buf = match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => return Err(RestError::Io(format!("{method} {path}: timed out"))),
            Ok(Err(e)) => return Err(RestError::Io(format!("{method} {path}: {e}"))),
            Ok(Ok(b)) => b,
        };
        parse_response(&buf).map_err(|e| RestError::Io(format!("{method} {path}: {e}")))
    }

    async fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, RestError> {
        self.request(method, path, body).await?.ok()?.json()
    }

    /// `POST /v1/conversations`: the new conversation's id.
    pub async fn create_conversation<S: AsRef<str>>(
        &self,
        members: &[S],
        title: &str,
    ) -> Result<i64, RestError> {
        let members: Vec<&str> = members.iter().map(AsRef::as_ref).collect();
        let v = self
            .json(
                "POST",
                "/v1/conversations",
                Some(&json!({"members": members, "title": title})),
            )
            .await?;
        v["id"]
            .as_i64()
            .ok_or_else(|| RestError::Io(format!("no id in {v}")))
    }

    /// `POST /v1/conversations/{id}/members`.
    pub async fn add_member(&self, conversation_id: i64, user: &str) -> Result<Value, RestError> {
        let path = format!("/v1/conversations/{conversation_id}/members");
        self.json("POST", &path, Some(&json!({"user": user}))).await
    }

    /// `DELETE /v1/conversations/{id}/members/{user}`.
    pub async fn remove_member(
        &self,
        conversation_id: i64,
        user: &str,
    ) -> Result<Value, RestError> {
        let path = format!("/v1/conversations/{conversation_id}/members/{user}");
        self.json("DELETE", &path, None).await
    }

    /// `POST /v1/conversations/{id}/messages`: the stored event, and whether
    /// it was a repeat of an earlier `client_msg_id` (200 instead of 201).
    pub async fn send_message(
        &self,
        conversation_id: i64,
        body: &str,
        client_msg_id: Option<&str>,
    ) -> Result<(EventFrame, bool), RestError> {
        let path = format!("/v1/conversations/{conversation_id}/messages");
        let mut req = json!({"body": body});
        if let Some(id) = client_msg_id {
            req["client_msg_id"] = id.into();
        }
        let r = self.request("POST", &path, Some(&req)).await?.ok()?;
        let duplicate = r.status == 200;
        let e: EventFrame = serde_json::from_str(&r.body)
            .map_err(|e| RestError::Io(format!("bad event JSON ({e}): {:.200}", r.body)))?;
        Ok((e, duplicate))
    }

    /// `GET /v1/conversations?after=&limit=`: `{"conversations":[...],"next":...}`.
    pub async fn list_conversations(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Value, RestError> {
        let mut path = format!("/v1/conversations?limit={limit}");
        if let Some(a) = after {
            path.push_str(&format!("&after={a}"));
        }
        self.json("GET", &path, None).await
    }

    /// `GET /v1/conversations/{id}/events?before_seq=&limit=` (newest first).
    pub async fn events_page(
        &self,
        conversation_id: i64,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<EventsPage, RestError> {
        let mut path = format!("/v1/conversations/{conversation_id}/events?limit={limit}");
        if let Some(b) = before_seq {
            path.push_str(&format!("&before_seq={b}"));
        }
        let v = self.json("GET", &path, None).await?;
        let events: Vec<EventFrame> = serde_json::from_value(v["events"].clone())
            .map_err(|e| RestError::Io(format!("bad events page ({e})")))?;
        Ok(EventsPage {
            events,
            next_before_seq: v["next_before_seq"].as_i64(),
        })
    }

    /// `GET path` without caring about the status (e.g. `/ready`, `/health`).
    pub async fn get(&self, path: &str) -> Result<Response, RestError> {
        self.request("GET", path, None).await
    }
}

/// Parses a complete response (the connection was read to its end).
fn parse_response(buf: &[u8]) -> Result<Response, String> {
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("connection closed before the response head")?;
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "non-UTF-8 response head")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let rest = &buf[head_end + 4..];
    let body =
        if find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            dechunk(rest)?
        } else if let Some(len) = find("content-length") {
            let len: usize = len.parse().map_err(|_| "bad Content-Length")?;
            if rest.len() < len {
                return Err("connection closed mid-body".into());
            }
            rest[..len].to_vec()
        } else {
            rest.to_vec()
        };
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk")?;
        let line = std::str::from_utf8(&rest[..end]).map_err(|_| "bad chunk line")?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {line:?}"))?;
        rest = &rest[end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r = parse_response(
            b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 8\r\n\r\n{\"id\":7}",
        )
        .unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.json().unwrap()["id"], 7);
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, "abcde");
        let e = parse_response(
            b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 2\r\ncontent-length: 46\r\n\r\n{\"error\":\"rate_limited\",\"message\":\"slow down\"}",
        )
        .unwrap()
        .ok()
        .unwrap_err();
        assert_eq!(
            e,
            RestError::Http {
                status: 429,
                code: "rate_limited".into(),
                message: "slow down".into(),
                retry_after: Some(2)
            }
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn base_url_forms() {
        assert_eq!(
            Rest::new("http://127.0.0.1:8080", "t").authority,
            "127.0.0.1:8080"
        );
        assert_eq!(Rest::new("http://h:1/x/y", "t").authority, "h:1");
        assert_eq!(Rest::new("h:2", "t").authority, "h:2");
    }
}
