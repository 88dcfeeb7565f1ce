//! [`WsClient`]: a thin WebSocket client that sees every frame and close
//! code (the protocol tests send malformed frames on purpose, which a
//! resuming client would hide).

use super::*;

/// Why a WebSocket connection could not be opened.
#[derive(Debug)]
pub enum ConnectError {
    /// The server answered the upgrade request with a non-101 status.
    Http { status: u16, body: String },
    /// Anything else (connection refused, timeout, protocol error).
    Other(String),
}

impl ConnectError {
    /// The HTTP status of a refused upgrade (e.g. 401).
    pub fn status(&self) -> Option<u16> {
        match self {
            ConnectError::Http { status, .. } => Some(*status),
            ConnectError::Other(_) => None,
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Http { status, body } => {
                write!(f, "upgrade refused with HTTP {status}: {body}")
            }
            ConnectError::Other(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// One thing read from a WebSocket.
#[derive(Debug, Clone)]
pub enum WsEvent {
    /// A text frame, parsed as JSON.
    Json(Value),
    /// The server sent a Close frame (its code, if any) or the connection
    /// ended (`None`).
    Closed(Option<u16>),
    /// Nothing within the timeout.
    Timeout,
}

/// How long a WebSocket handshake may take.
pub const WS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A WebSocket client speaking the contract's JSON frames.
pub struct WsClient {
    pub ws: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
    /// The `hello` frame, once [`WsClient::read_until_synced`] (or
    /// [`WsClient::recv_json`]) has seen it.
    pub hello: Option<Value>,
    close_code: Option<u16>,
    closed: bool,
}

impl WsClient {
    /// Connects to `ws_url?token=TOKEN`.
    pub async fn connect(ws_url: &str, token: &str) -> Result<WsClient, ConnectError> {
        let sep = if ws_url.contains('?') { '&' } else { '?' };
        Self::connect_request(&format!("{ws_url}{sep}token={token}"), None).await
    }

    /// Connects to `ws_url` with `Authorization: Bearer TOKEN`.
    pub async fn connect_with_header(ws_url: &str, token: &str) -> Result<WsClient, ConnectError> {
        Self::connect_request(ws_url, Some(token)).await
    }

    /// Connects to `ws_url` as given (no token added).
    pub async fn connect_url(ws_url: &str) -> Result<WsClient, ConnectError> {
        Self::connect_request(ws_url, None).await
    }

    /// Connects offering `Sec-WebSocket-Protocol: tether.v1,
    /// tether.token.TOKEN` (the token out of the URL, as browsers do);
    /// returns the subprotocol the server chose too.
    pub async fn connect_with_subprotocol(
        ws_url: &str,
        token: &str,
    ) -> Result<(WsClient, Option<String>), ConnectError> {
        let mut request = ws_url
            .into_client_request()
            .map_err(|e| ConnectError::Other(format!("bad URL {ws_url}: {e}")))?;
        request.headers_mut().insert(
            "sec-websocket-protocol",
            format!("tether.v1, tether.token.{token}")
                .parse()
                .map_err(|e| ConnectError::Other(format!("bad token: {e}")))?,
        );
        let (ws, response) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(|e| ConnectError::Other(format!("connecting to {ws_url}: {e}")))?;
        let chosen = response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok((
            WsClient {
                ws,
                hello: None,
                close_code: None,
                closed: false,
            },
            chosen,
        ))
    }

    async fn connect_request(url: &str, bearer: Option<&str>) -> Result<WsClient, ConnectError> {
        let mut request = url
            .into_client_request()
            .map_err(|e| ConnectError::Other(format!("bad URL {url}: {e}")))?;
        if let Some(t) = bearer {
            request.headers_mut().insert(
                "authorization",
                format!("Bearer {t}")
                    .parse()
                    .map_err(|e| ConnectError::Other(format!("bad token: {e}")))?,
            );
        }
        let connecting = tokio_tungstenite::connect_async(request);
        let (ws, _response) = match tokio::time::timeout(WS_CONNECT_TIMEOUT, connecting).await {
            Err(_) => {
                return Err(ConnectError::Other(format!(
                    "connecting to {url} timed out"
                )))
            }
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
                let body = response
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                return Err(ConnectError::Http {
                    status: response.status().as_u16(),
                    body,
                });
            }
            Ok(Err(e)) => return Err(ConnectError::Other(format!("connecting to {url}: {e}"))),
            Ok(Ok(pair)) => pair,
        };
        Ok(WsClient {
            ws,
            hello: None,
            close_code: None,
            closed: false,
        })
    }

    /// Sends one JSON text frame.
    pub async fn send_json(&mut self, value: &Value) {
        self.send_raw(Message::text(value.to_string())).await
    }

    /// Sends any frame (binary, oversized, ping, close...). Panics if the
    /// connection is gone (use `self.ws` directly to observe that).
    pub async fn send_raw(&mut self, message: Message) {
        self.ws
            .send(message)
            .await
            .unwrap_or_else(|e| panic!("sending a WebSocket frame: {e}"))
    }

    /// Sends a Close frame with `code`.
    pub async fn close(&mut self, code: u16) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        let _ = self.ws.send(Message::Close(Some(frame))).await;
    }

    /// The next data frame, a close, or a timeout. Ping/pong frames are
    /// skipped (tungstenite answers pings by itself).
    pub async fn next_event(&mut self, timeout: Duration) -> WsEvent {
        if self.closed {
            return WsEvent::Closed(self.close_code);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return WsEvent::Timeout,
                Ok(next) => next,
            };
            match next {
                Some(Ok(Message::Text(text))) => {
                    let value: Value = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("server sent non-JSON text ({e}): {text}"));
                    if self.hello.is_none() && value["type"] == "hello" {
                        self.hello = Some(value.clone());
                    }
                    return WsEvent::Json(value);
                }
                Some(Ok(Message::Binary(b))) => {
                    panic!("server sent a binary frame ({} bytes)", b.len())
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(frame))) => {
                    self.closed = true;
                    self.close_code = frame.map(|f| u16::from(f.code));
                    return WsEvent::Closed(self.close_code);
                }
                Some(Err(_)) | None => {
                    self.closed = true;
                    return WsEvent::Closed(self.close_code);
                }
            }
        }
    }

    /// The next JSON frame; `None` on timeout or when the connection closed
    /// (see [`WsClient::close_code`], [`WsClient::is_closed`]).
    pub async fn recv_json(&mut self, timeout: Duration) -> Option<Value> {
        match self.next_event(timeout).await {
            WsEvent::Json(v) => Some(v),
            WsEvent::Closed(_) | WsEvent::Timeout => None,
        }
    }

    /// Reads frames until one satisfies `pred` (returned) within `timeout`;
    /// the frames before it are dropped.
    pub async fn recv_until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self.recv_json(left).await?;
            if pred(&v) {
                return Some(v);
            }
        }
    }

    /// Reads `hello` (if not yet seen), then the backlog up to
    /// `{"type":"synced"}`, and returns the `event` frames of the backlog.
    /// Panics on timeout or close, showing what arrived.
    pub async fn read_until_synced(&mut self, timeout: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = Vec::new();
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                WsEvent::Json(v) => match v["type"].as_str() {
                    Some("synced") => {
                        assert!(
                            self.hello.is_some(),
                            "synced before hello; frames: {seen:?}"
                        );
                        return events;
                    }
                    Some("hello") => {}
                    Some("event") => {
                        assert!(self.hello.is_some(), "event before hello: {v}");
                        events.push(v.clone());
                    }
                    _ => seen.push(v),
                },
                other => panic!(
                    "no synced within {timeout:?} ({other:?}); {} events, other frames: {seen:?}",
                    events.len()
                ),
            }
        }
    }

    /// Reads until the server closes (dropping data frames) and returns the
    /// close code; `None` if it did not close within `timeout` or closed
    /// without a code.
    pub async fn wait_close(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                WsEvent::Json(_) => continue,
                WsEvent::Closed(code) => return code,
                WsEvent::Timeout => return None,
            }
        }
    }

    /// The code of the Close frame the server sent, once one was read.
    pub fn close_code(&self) -> Option<u16> {
        self.close_code
    }

    /// Whether the connection ended (Close frame read or stream ended).
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}
