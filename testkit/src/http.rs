//! HTTP requests through the project's one HTTP client
//! (`tether_client::Rest`), and [`send_request`], the one raw-bytes helper
//! the hostile-input tests use.

use super::*;

/// A whole HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The body as JSON (panics, quoting the body, if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "response {} is not JSON ({e}): {:?}",
                self.status, self.body
            )
        })
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How long one HTTP exchange may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// `METHOD PATH` with an optional bearer token and JSON body. Panics on
/// I/O errors (use [`try_http_raw`] to observe them).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> HttpResponse {
    let body = body.map(|b| serde_json::to_vec(b).unwrap());
    let ct = body.as_ref().map(|_| "application/json");
    try_http_raw(addr, method, path, token, ct, body.as_deref())
        .await
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// Like [`http`] with an arbitrary body (malformed JSON, invalid UTF-8...)
/// sent as `Content-Type: application/json`.
pub async fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> HttpResponse {
    try_http_raw(
        addr,
        method,
        path,
        token,
        Some("application/json"),
        Some(body),
    )
    .await
    .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// The general form: returns I/O errors (connection refused, timeout...).
/// One request on a connection of its own (the client, and so its pool,
/// lives for this call only).
pub async fn try_http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Option<&[u8]>,
) -> io::Result<HttpResponse> {
    try_http_within(addr, method, path, token, content_type, body, HTTP_TIMEOUT).await
}

async fn try_http_within(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Option<&[u8]>,
    timeout: Duration,
) -> io::Result<HttpResponse> {
    let mut rest = tether_client::Rest::new(&format!("http://{addr}"), token.unwrap_or(""));
    rest.timeout = timeout;
    let body = body.map(|b| (content_type.unwrap_or("application/json"), b.to_vec()));
    match rest.send(method, path, body).await {
        Ok(r) => Ok(HttpResponse {
            status: r.status,
            headers: r.headers,
            body: r.body,
        }),
        Err(tether_client::RestError::Connect { kind, message }) => {
            Err(io::Error::new(kind, message))
        }
        Err(e) if e.to_string().contains("timed out") => {
            Err(io::Error::new(io::ErrorKind::TimedOut, e.to_string()))
        }
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}

/// Sends `request` (bytes as given, e.g. a deliberately broken request) and
/// reads the response.
pub async fn send_request(addr: SocketAddr, request: &[u8]) -> io::Result<HttpResponse> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            buf.extend_from_slice(&chunk[..n]);
            if let Some(response) = parse_response(&buf, n == 0)? {
                return Ok(response);
            }
        }
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "HTTP exchange timed out",
            ))
        })
}

/// A blocking [`try_http_raw`], usable anywhere (inside a runtime too: the
/// request runs on a thread of its own), giving up after 5 s.
pub fn http_blocking(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> io::Result<HttpResponse> {
    let body = body.map(|b| serde_json::to_vec(b).unwrap());
    let (method, path, token) = (
        method.to_string(),
        path.to_string(),
        token.map(str::to_string),
    );
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let ct = body.as_ref().map(|_| "application/json");
        rt.block_on(try_http_within(
            addr,
            &method,
            &path,
            token.as_deref(),
            ct,
            body.as_deref(),
            Duration::from_secs(5),
        ))
    })
    .join()
    .expect("the request thread")
}

/// Parses a response from `buf`: `Ok(None)` while incomplete (more bytes
/// needed), an error if `eof` came before it was complete or it is
/// malformed.
pub fn parse_response(buf: &[u8], eof: bool) -> io::Result<Option<HttpResponse>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let incomplete = |eof: bool| {
        if eof {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-response",
            ))
        } else {
            Ok(None)
        }
    };
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return incomplete(eof);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("non-UTF-8 header"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let rest = &buf[head_end + 4..];
    let body: Vec<u8> = if status < 200 || status == 204 || status == 304 {
        Vec::new()
    } else if header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        match decode_chunked(rest).map_err(|e| bad(&e))? {
            Some(b) => b,
            None => return incomplete(eof),
        }
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad Content-Length"))?;
        if rest.len() < len {
            return incomplete(eof);
        }
        rest[..len].to_vec()
    } else if eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }))
}

/// Decodes a chunked body: `Ok(None)` while incomplete.
fn decode_chunked(mut rest: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size line")?;
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(size_hex, 16).map_err(|_| format!("bad chunk size {line:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                if end == 0 {
                    return Ok(Some(body));
                }
                rest = &rest[end + 2..];
            }
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[..size]);
        if &rest[size..size + 2] != b"\r\n" {
            return Err("chunk not followed by CRLF".into());
        }
        rest = &rest[size + 2..];
    }
}
