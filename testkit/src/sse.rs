//! [`SseClient`]: a raw streaming HTTP/1.1 client for `GET /v1/sse` that
//! sees every event, comment and the end of the stream (a resuming client,
//! like `EventSource`, would hide them). It decodes the chunked body and
//! the event-stream format itself, byte by byte as they arrive.

use super::*;

/// One event of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` (`message` when absent, as in `EventSource`).
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

impl SseEvent {
    /// The data as JSON (panics, quoting it, if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| {
            panic!(
                "event {:?}: data is not JSON ({e}): {:?}",
                self.event, self.data
            )
        })
    }
}

/// One thing read from a stream.
#[derive(Debug, Clone)]
pub enum SseRead {
    Event(SseEvent),
    /// The server ended the stream, or the connection closed.
    Ended,
    /// Nothing within the timeout.
    Timeout,
}

/// An open event stream.
pub struct SseClient {
    stream: tokio::net::TcpStream,
    /// Bytes read and not yet decoded from the chunked encoding.
    raw: Vec<u8>,
    /// Decoded body bytes not yet parsed into events.
    body: Vec<u8>,
    ended: bool,
    pub headers: Vec<(String, String)>,
    /// Comment lines seen (`: ping`).
    pub comments: usize,
    /// The last `retry:` value seen.
    pub retry: Option<u64>,
    /// The `hello` data, once [`SseClient::read_until_synced`] saw it.
    pub hello: Option<Value>,
}

impl SseClient {
    /// `GET path` (with its query) with an optional bearer token. A
    /// non-200 answer is `Err((status, body))`.
    pub async fn connect(
        addr: SocketAddr,
        path: &str,
        token: Option<&str>,
    ) -> Result<SseClient, (u16, String)> {
        let io = |e: io::Error| (0, e.to_string());
        let mut stream = tokio::time::timeout(HTTP_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| (0, "connect timed out".to_string()))?
            .map_err(io)?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{auth}\r\n"
        );
        stream.write_all(req.as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        let head_end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = tokio::time::timeout(HTTP_TIMEOUT, stream.read(&mut chunk))
                .await
                .map_err(|_| (0, "response head timed out".to_string()))?
                .map_err(io)?;
            if n == 0 {
                return Err((0, "closed before a response".into()));
            }
            raw.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if status != 200 {
            // The whole error response, for the caller to look at.
            let mut buf = raw.clone();
            loop {
                if let Ok(Some(r)) = parse_response(&buf, false) {
                    return Err((r.status, r.body));
                }
                let n = match tokio::time::timeout(HTTP_TIMEOUT, stream.read(&mut chunk)).await {
                    Ok(Ok(n)) => n,
                    _ => 0,
                };
                if n == 0 {
                    let body = parse_response(&buf, true)
                        .ok()
                        .flatten()
                        .map_or(head.clone(), |r| r.body);
                    return Err((status, body));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
        let headers = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Ok(SseClient {
            stream,
            raw: raw[head_end..].to_vec(),
            body: Vec::new(),
            ended: false,
            headers,
            comments: 0,
            retry: None,
            hello: None,
        })
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Moves whole chunks from `raw` to `body`; marks the end at the last
    /// (zero-length) chunk.
    fn dechunk(&mut self) {
        loop {
            let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size_line = String::from_utf8_lossy(&self.raw[..eol]).to_string();
            let size_hex = size_line.split(';').next().unwrap_or("").trim();
            let Ok(size) = usize::from_str_radix(size_hex, 16) else {
                self.ended = true;
                return;
            };
            if size == 0 {
                self.ended = true;
                return;
            }
            if self.raw.len() < eol + 2 + size + 2 {
                return;
            }
            self.body
                .extend_from_slice(&self.raw[eol + 2..eol + 2 + size]);
            self.raw.drain(..eol + 2 + size + 2);
        }
    }

    /// One event from `body`, if a whole one is there (comments and
    /// `retry:` are counted on the way).
    fn parse_one(&mut self) -> Option<SseEvent> {
        loop {
            let end = self.body.windows(2).position(|w| w == b"\n\n")?;
            let block = String::from_utf8_lossy(&self.body[..end]).to_string();
            self.body.drain(..end + 2);
            let mut ev = SseEvent {
                event: "message".into(),
                id: None,
                data: String::new(),
            };
            let mut has_data = false;
            for line in block.lines() {
                if line.starts_with(':') {
                    self.comments += 1;
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => ev.event = value.to_string(),
                    "id" => ev.id = Some(value.to_string()),
                    "retry" => self.retry = value.parse().ok(),
                    "data" => {
                        if has_data {
                            ev.data.push('\n');
                        }
                        ev.data.push_str(value);
                        has_data = true;
                    }
                    _ => {}
                }
            }
            if has_data {
                return Some(ev);
            }
        }
    }

    /// The next event, the end of the stream, or a timeout.
    pub async fn next_event(&mut self, timeout: Duration) -> SseRead {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            self.dechunk();
            if let Some(ev) = self.parse_one() {
                return SseRead::Event(ev);
            }
            if self.ended {
                return SseRead::Ended;
            }
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return SseRead::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.ended = true;
                }
                Ok(Ok(n)) => self.raw.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads `hello` (kept in [`SseClient::hello`]), the backlog and
    /// `synced`; returns the backlog's event data. Panics on anything else.
    pub async fn read_until_synced(&mut self, timeout: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            match self.next_event(timeout).await {
                SseRead::Event(e) if e.event == "hello" => self.hello = Some(e.json()),
                SseRead::Event(e) if e.event == "synced" => return out,
                SseRead::Event(e) if e.event == "event" => {
                    let v = e.json();
                    assert_eq!(
                        e.id,
                        Some(format!("{}:{}", v["conversation_id"], v["seq"])),
                        "an event's id is conversation:seq"
                    );
                    out.push(v);
                }
                // The database is down at connect: the backlog follows (and
                // the stream's pings meanwhile).
                SseRead::Event(e) if e.event == "failure" || e.event == "ping" => {}
                other => panic!("before synced: {other:?}"),
            }
        }
    }

    /// Reads until an `event` whose data satisfies `pred` (returned), the
    /// end of the stream or the timeout (`None`).
    pub async fn recv_until(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                SseRead::Event(e) if e.event == "event" => {
                    let v = e.json();
                    if pred(&v) {
                        return Some(v);
                    }
                }
                SseRead::Event(_) => {}
                SseRead::Ended | SseRead::Timeout => return None,
            }
        }
    }
}
