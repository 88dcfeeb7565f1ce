//! Where to connect and over what: a configured URL turned into the
//! WebSocket and HTTP endpoints (accepted like the JS SDK's: a base URL of
//! any of the four schemes, the `/v1/ws` path appended), and the byte
//! stream under the WebSocket (TCP, or rustls over TCP with the `tls`
//! feature).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The endpoints of one gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// `ws[s]://host[:port][/prefix]/v1/ws`
    pub ws: String,
    /// `http[s]://host[:port][/prefix]`
    pub http: String,
    pub tls: bool,
    /// Without brackets for IPv6.
    pub host: String,
    pub port: u16,
}

/// Reads `url`: `ws`, `wss`, `http` or `https`; no scheme means `http`; a
/// path prefix is kept and `/v1/ws` appended unless there. An error says
/// what is wrong (a configuration error: retrying cannot help).
pub fn endpoints(url: &str) -> Result<Endpoints, String> {
    let url = url.trim();
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r),
        None => ("http".to_string(), url),
    };
    let tls = match scheme.as_str() {
        "ws" | "http" => false,
        "wss" | "https" => true,
        other => {
            return Err(format!(
                "unsupported scheme {other}:// in {url:?} (use http://, https://, ws:// or wss://)"
            ))
        }
    };
    if tls && !cfg!(feature = "tls") {
        return Err(format!(
            "{url:?} needs TLS: enable tether-client's `tls` feature"
        ));
    }
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!(
            "no host (or userinfo, which is not supported) in {url:?}"
        ));
    }
    let mut path = path.trim_end_matches('/');
    if let Some(p) = path.strip_suffix("/v1/ws") {
        path = p;
    }
    let (host, port) = split_authority(authority, if tls { 443 } else { 80 })
        .ok_or_else(|| format!("bad host or port in {url:?}"))?;
    let (ws, http) = if tls {
        ("wss", "https")
    } else {
        ("ws", "http")
    };
    Ok(Endpoints {
        ws: format!("{ws}://{authority}{path}/v1/ws"),
        http: format!("{http}://{authority}{path}"),
        tls,
        host,
        port,
    })
}

fn split_authority(authority: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => Some((h.to_string(), p.parse().ok()?)),
        Some(_) => None,
        None => Some((authority.to_string(), default_port)),
    }
}

/// The TLS settings for `wss://` and `https://`: the webpki roots, ring.
#[cfg(feature = "tls")]
pub fn tls_config() -> std::sync::Arc<rustls::ClientConfig> {
    use std::sync::{Arc, OnceLock};
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots =
                rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// The WebSocket's byte stream.
pub enum Stream {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// Wraps `tcp` in TLS when `tls` (the certificate checked against
    /// `host`, with `config` or the default roots).
    pub async fn new(
        tcp: TcpStream,
        tls: bool,
        host: &str,
        #[cfg(feature = "tls")] config: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> io::Result<Stream> {
        if !tls {
            return Ok(Stream::Plain(tcp));
        }
        #[cfg(feature = "tls")]
        {
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let connector = tokio_rustls::TlsConnector::from(config.unwrap_or_else(tls_config));
            Ok(Stream::Tls(Box::new(connector.connect(name, tcp).await?)))
        }
        #[cfg(not(feature = "tls"))]
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("TLS to {host} needs tether-client's `tls` feature"),
        ))
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            #[cfg(feature = "tls")]
            Stream::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_accepted_like_the_js_sdk() {
        for url in [
            "http://h:8080",
            "http://h:8080/",
            "ws://h:8080/v1/ws",
            "ws://h:8080/v1/ws/",
            "h:8080",
            "http://h:8080/v1/ws?token=x",
        ] {
            let e = endpoints(url).unwrap();
            assert_eq!(e.ws, "ws://h:8080/v1/ws", "{url}");
            assert_eq!(e.http, "http://h:8080", "{url}");
            assert_eq!((e.host.as_str(), e.port, e.tls), ("h", 8080, false));
        }
        let e = endpoints("http://h/chat/").unwrap();
        assert_eq!(
            (e.ws.as_str(), e.http.as_str(), e.port),
            ("ws://h/chat/v1/ws", "http://h/chat", 80)
        );
        let e = endpoints("ws://[::1]:9/v1/ws").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 9));
    }

    #[test]
    fn configuration_errors_say_what_is_wrong() {
        assert!(endpoints("ftp://h:1")
            .unwrap_err()
            .contains("unsupported scheme ftp"));
        assert!(endpoints("http://").unwrap_err().contains("no host"));
        assert!(endpoints("http://h:notaport")
            .unwrap_err()
            .contains("bad host or port"));
        let tls = endpoints("wss://h/v1/ws");
        if cfg!(feature = "tls") {
            assert_eq!(tls.unwrap().port, 443);
        } else {
            assert!(tls.unwrap_err().contains("`tls` feature"));
        }
    }
}
