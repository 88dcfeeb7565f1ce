//! The client's address behind a load balancer.
//!
//! Behind a balancer every TCP connection comes from the balancer, so the
//! peer address says nothing about the client. Two ways carry the real
//! one, and both are believed only from the peers listed in
//! `--proxy-protocol-from` ([`TrustedNets`]):
//!
//! - the PROXY protocol v2 header ([`crate::proxy_protocol`]) at the start
//!   of the connection, read by [`read_proxy_header`] (HAProxy
//!   `send-proxy-v2`, AWS NLB, GCP's TCP proxy);
//! - `X-Forwarded-For` on each request ([`client_ip`]; nginx, AWS ALB,
//!   GCP's HTTP(S) balancer).
//!
//! Untrusted input is never believed: from a peer outside the set, a
//! PROXY header is not even looked for (its bytes reach the HTTP parser,
//! which refuses them with 400) and `X-Forwarded-For` is ignored. From a
//! trusted peer, a malformed header closes that connection and changes
//! nothing else. The resolved address is what the logs show and what
//! `--max-connections-per-ip` counts.

use crate::proxy_protocol::{self, Header, ProxyError, Sniff};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// One network: an address and a prefix length (`10.0.0.0/8`,
/// `::1/128`; a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?}: not an IP address"))?;
        let net = net.to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { net, prefix })
    }
}

/// The peers whose PROXY headers and `X-Forwarded-For` are believed
/// (`--proxy-protocol-from`, comma-separated CIDRs); empty: nobody's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedNets(Vec<Cidr>);

impl TrustedNets {
    /// Parses `10.0.0.0/8,192.168.1.5,::1` (spaces allowed; empty: none).
    pub fn parse(list: &str) -> Result<TrustedNets, String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<Cidr>, String>>()
            .map(TrustedNets)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why a trusted peer's connection is closed before any HTTP.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error(transparent)]
    Malformed(#[from] ProxyError),
    #[error("PROXY header not complete within {0:?}")]
    Timeout(Duration),
    /// Not one byte within the time: an idle connection, not a bad header.
    #[error("nothing sent within {0:?}")]
    Silent(Duration),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// The connection's client address: for a trusted peer that starts with a
/// PROXY v2 header, the header's source (the header is consumed); for
/// any other connection the peer itself (nothing is read). A trusted
/// peer's connection without a header is served as is (a balancer's
/// health check, or a front that sends `X-Forwarded-For` instead).
pub async fn read_proxy_header(
    stream: &mut TcpStream,
    peer: SocketAddr,
    trusted: &TrustedNets,
    within: Duration,
) -> Result<SocketAddr, HeaderError> {
    if !trusted.contains(peer.ip()) {
        return Ok(peer);
    }
    let mut started = false;
    let read = async {
        let mut first = [0u8; proxy_protocol::FIXED_LEN];
        let len = loop {
            let n = stream.peek(&mut first).await?;
            started |= n > 0;
            match proxy_protocol::sniff(&first[..n]) {
                Sniff::NotProxy => return Ok(peer),
                // EOF: nothing for HTTP either; let hyper see it.
                Sniff::NeedMore if n == 0 => return Ok(peer),
                // Part of the fixed part arrived: peek returns at once
                // while data is buffered, so wait a moment, not a spin.
                Sniff::NeedMore => tokio::time::sleep(Duration::from_millis(2)).await,
                Sniff::Header { len } => break len,
            }
        };
        if len > proxy_protocol::MAX_LEN {
            return Err(ProxyError::TooLong(len).into());
        }
        let mut header = vec![0u8; len];
        stream.read_exact(&mut header).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                HeaderError::Malformed(ProxyError::Truncated { need: len, got: 0 })
            } else {
                HeaderError::Io(e)
            }
        })?;
        Ok(match proxy_protocol::parse(&header)? {
            Header::Proxied { source, .. } => source,
            Header::Local | Header::Unspecified => peer,
        })
    };
    match tokio::time::timeout(within, read).await {
        Ok(result) => result,
        Err(_) if !started => Err(HeaderError::Silent(within)),
        Err(_) => Err(HeaderError::Timeout(within)),
    }
}

/// A request's client address: starting from the connection's (`conn`,
/// after any PROXY header), walk `X-Forwarded-For` from its last entry
/// back, one hop per address that is trusted, and stop at the first that
/// is not (everything left of it could be forged by the client). An
/// unparsable entry stops the walk at the last trusted hop.
pub fn client_ip<'a>(
    conn: IpAddr,
    forwarded_for: impl Iterator<Item = &'a [u8]>,
    trusted: &TrustedNets,
) -> IpAddr {
    let mut ip = conn.to_canonical();
    if !trusted.contains(ip) {
        return ip;
    }
    let values: Vec<&[u8]> = forwarded_for.collect();
    let entries = values
        .iter()
        .rev()
        .flat_map(|v| v.rsplit(|b| *b == b','))
        .map(|e| std::str::from_utf8(e).map(str::trim));
    for entry in entries {
        let Some(next) = entry.ok().and_then(parse_forwarded_entry) else {
            return ip;
        };
        ip = next.to_canonical();
        if !trusted.contains(ip) {
            return ip;
        }
    }
    ip
}

/// One `X-Forwarded-For` entry: an address, possibly with a port
/// (`1.2.3.4:5`, `[::1]:5`), as some proxies write it.
fn parse_forwarded_entry(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    s.parse::<SocketAddr>().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(s: &str) -> TrustedNets {
        TrustedNets::parse(s).unwrap()
    }

    #[test]
    fn cidrs_parse_and_match() {
        let t = nets("10.0.0.0/8, 192.168.1.5,::1, 2001:db8::/32");
        assert!(t.contains(ip("10.255.0.1")));
        assert!(!t.contains(ip("11.0.0.1")));
        assert!(t.contains(ip("192.168.1.5")));
        assert!(!t.contains(ip("192.168.1.6")));
        assert!(t.contains(ip("::1")));
        assert!(t.contains(ip("2001:db8:ffff::1")));
        // An IPv4 peer on a dual-stack socket.
        assert!(t.contains(ip("::ffff:10.1.2.3")));
        assert!(nets("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(!nets("0.0.0.0/0").contains(ip("::2")));
        assert!(nets("").is_empty());
        assert!(!nets("").contains(ip("127.0.0.1")));
        for bad in ["10.0.0.0/33", "x", "10.0.0.0/", "::1/129", "1.2.3.4/-1"] {
            assert!(TrustedNets::parse(bad).is_err(), "{bad}");
        }
    }

    fn resolve(conn: &str, xff: &[&str], trusted: &str) -> IpAddr {
        client_ip(ip(conn), xff.iter().map(|s| s.as_bytes()), &nets(trusted))
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_hops() {
        let lb = "10.0.0.0/8";
        // From the balancer: the client it saw.
        assert_eq!(resolve("10.0.0.2", &["203.0.113.9"], lb), ip("203.0.113.9"));
        // From anyone else: ignored, whatever it says.
        assert_eq!(
            resolve("198.51.100.4", &["1.1.1.1"], lb),
            ip("198.51.100.4")
        );
        assert_eq!(
            resolve("198.51.100.4", &["10.0.0.9"], lb),
            ip("198.51.100.4")
        );
        // A client's forged entry left of the balancer's is not believed.
        assert_eq!(
            resolve("10.0.0.2", &["6.6.6.6, 203.0.113.9"], lb),
            ip("203.0.113.9")
        );
        // Several trusted hops, several headers: the last header is the
        // nearest hop.
        assert_eq!(
            resolve("10.0.0.2", &["6.6.6.6, 203.0.113.9", "10.0.0.7"], lb),
            ip("203.0.113.9")
        );
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(resolve("10.0.0.2", &["not-an-ip"], lb), ip("10.0.0.2"));
        assert_eq!(
            resolve("10.0.0.2", &["203.0.113.9, 10.0.0.3, junk"], lb),
            ip("10.0.0.2")
        );
        assert_eq!(resolve("10.0.0.2", &[""], lb), ip("10.0.0.2"));
        // No header: the balancer itself.
        assert_eq!(resolve("10.0.0.2", &[], lb), ip("10.0.0.2"));
        // Ports as some proxies write them.
        assert_eq!(
            resolve("10.0.0.2", &["203.0.113.9:4711"], lb),
            ip("203.0.113.9")
        );
        assert_eq!(
            resolve("10.0.0.2", &["[2001:db8::5]:1"], lb),
            ip("2001:db8::5")
        );
        // Nobody trusted: never believed.
        assert_eq!(resolve("10.0.0.2", &["203.0.113.9"], ""), ip("10.0.0.2"));
    }

    #[test]
    fn non_utf8_forwarded_for_is_ignored() {
        let t = nets("127.0.0.1");
        let bad: &[u8] = b"\xff\xfe";
        assert_eq!(
            client_ip(ip("127.0.0.1"), std::iter::once(bad), &t),
            ip("127.0.0.1")
        );
    }
}
