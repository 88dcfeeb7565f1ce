//! The PROXY protocol, version 2 (the binary header HAProxy's
//! `send-proxy-v2` and cloud balancers prepend to a TCP connection), as a
//! pure parser: bytes in, the client's address or a typed error out. No
//! I/O here; [`crate::client_addr`] reads the header from a connection,
//! and only from a trusted peer.
//!
//! Format (haproxy.org, doc/proxy-protocol.txt, section 2.2): a 12-byte
//! signature, a version/command byte (0x20 LOCAL, 0x21 PROXY), a
//! family/transport byte, a big-endian u16 length of what follows, then
//! the addresses (IPv4: 4+4+2+2 bytes, IPv6: 16+16+2+2) and optional TLVs,
//! which are skipped. Version 1 (the text form) is not accepted.
//!
//! Written here rather than taken from a crate: it is sixty lines, it
//! parses untrusted-looking bytes on the accept path, and owning it keeps
//! its behaviour on every malformed input under this module's tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12 bytes every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part: signature, version/command, family, length.
pub const FIXED_LEN: usize = 16;
/// The longest header accepted (addresses plus a few TLVs); anything
/// longer is refused rather than buffered.
pub const MAX_LEN: usize = 1024;

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// Not a version 2 header (e.g. an HTTP request).
    NotProxy,
    /// A prefix of the signature or of the fixed part: read more.
    NeedMore,
    /// A header of `len` bytes in all (fixed part included).
    Header { len: usize },
}

/// What a well-formed header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// `LOCAL`: the balancer's own connection (a health check): the peer
    /// is the client.
    Local,
    /// `PROXY` over TCP or UDP, IPv4 or IPv6: the original endpoints.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// `PROXY` with an address family we do not use (AF_UNSPEC, AF_UNIX):
    /// the header is consumed, the peer stays the client.
    Unspecified,
}

/// A header that cannot be used: the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY v2 signature")]
    Signature,
    #[error("PROXY protocol version {0} (only 2 is accepted)")]
    Version(u8),
    #[error("PROXY v2 command {0:#x} (LOCAL or PROXY expected)")]
    Command(u8),
    #[error("PROXY v2 address family/transport {0:#04x}")]
    Family(u8),
    #[error("PROXY v2 header of {0} bytes (at most {MAX_LEN})")]
    TooLong(usize),
    #[error("PROXY v2 header truncated: {got} of {need} bytes")]
    Truncated { need: usize, got: usize },
    #[error("PROXY v2 addresses of {len} bytes for family {family:#04x} (at least {need})")]
    AddressLength { family: u8, len: usize, need: usize },
}

/// Classifies the first bytes of a connection (what a `peek` returned).
pub fn sniff(buf: &[u8]) -> Sniff {
    let n = buf.len().min(SIGNATURE.len());
    if buf[..n] != SIGNATURE[..n] {
        return Sniff::NotProxy;
    }
    if buf.len() < FIXED_LEN {
        return Sniff::NeedMore;
    }
    Sniff::Header {
        len: FIXED_LEN + u16::from_be_bytes([buf[14], buf[15]]) as usize,
    }
}

/// Parses one whole header (exactly the bytes [`sniff`] announced).
pub fn parse(buf: &[u8]) -> Result<Header, ProxyError> {
    if buf.len() < FIXED_LEN {
        if !SIGNATURE.starts_with(&buf[..buf.len().min(12)]) {
            return Err(ProxyError::Signature);
        }
        return Err(ProxyError::Truncated {
            need: FIXED_LEN,
            got: buf.len(),
        });
    }
    if buf[..12] != SIGNATURE {
        return Err(ProxyError::Signature);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Err(ProxyError::Version(version));
    }
    let family = buf[13];
    let len = FIXED_LEN + u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if len > MAX_LEN {
        return Err(ProxyError::TooLong(len));
    }
    if buf.len() < len {
        return Err(ProxyError::Truncated {
            need: len,
            got: buf.len(),
        });
    }
    let body = &buf[FIXED_LEN..len];
    match command {
        // LOCAL: the receiver must ignore the family and addresses.
        0x0 => return Ok(Header::Local),
        0x1 => {}
        other => return Err(ProxyError::Command(other)),
    }
    // High nibble: address family; low nibble: transport (1 TCP, 2 UDP).
    let (addr_len, v6) = match family {
        0x11 | 0x12 => (12, false),
        0x21 | 0x22 => (36, true),
        0x00 | 0x31 | 0x32 => return Ok(Header::Unspecified),
        other => return Err(ProxyError::Family(other)),
    };
    if body.len() < addr_len {
        return Err(ProxyError::AddressLength {
            family,
            len: body.len(),
            need: addr_len,
        });
    }
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let (source, destination) = if v6 {
        let ip = |at: usize| {
            let mut o = [0u8; 16];
            o.copy_from_slice(&body[at..at + 16]);
            IpAddr::V6(Ipv6Addr::from(o))
        };
        (
            SocketAddr::new(ip(0), port(32)),
            SocketAddr::new(ip(16), port(34)),
        )
    } else {
        let ip = |at: usize| {
            IpAddr::V4(Ipv4Addr::new(
                body[at],
                body[at + 1],
                body[at + 2],
                body[at + 3],
            ))
        };
        (
            SocketAddr::new(ip(0), port(8)),
            SocketAddr::new(ip(4), port(10)),
        )
    };
    Ok(Header::Proxied {
        source,
        destination,
    })
}

/// Builds a header (for tests and tools): `PROXY` from `source` to
/// `destination` over TCP, or `LOCAL` when `None`.
pub fn encode(endpoints: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    let Some((src, dst)) = endpoints else {
        out.extend_from_slice(&[0x20, 0x00, 0, 0]);
        return out;
    };
    let mut body = Vec::new();
    let family = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            body.extend_from_slice(&s.octets());
            body.extend_from_slice(&d.octets());
            0x11
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            body.extend_from_slice(&v6(s).octets());
            body.extend_from_slice(&v6(d).octets());
            0x21
        }
    };
    body.extend_from_slice(&src.port().to_be_bytes());
    body.extend_from_slice(&dst.port().to_be_bytes());
    out.extend_from_slice(&[0x21, family]);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_and_ipv6_round_trip() {
        for (src, dst) in [
            (sa("203.0.113.7:51000"), sa("10.0.0.2:8080")),
            (sa("[2001:db8::1]:443"), sa("[2001:db8::2]:8080")),
        ] {
            let h = encode(Some((src, dst)));
            assert_eq!(sniff(&h), Sniff::Header { len: h.len() });
            assert_eq!(
                parse(&h),
                Ok(Header::Proxied {
                    source: src,
                    destination: dst
                })
            );
        }
        let local = encode(None);
        assert_eq!(sniff(&local), Sniff::Header { len: 16 });
        assert_eq!(parse(&local), Ok(Header::Local));
    }

    #[test]
    fn tlvs_after_the_addresses_are_skipped() {
        let mut h = encode(Some((sa("198.51.100.1:1"), sa("10.0.0.1:2"))));
        h.extend_from_slice(&[0x04, 0x00, 0x02, b'i', b'd']); // PP2_TYPE_NOOP
        let len = (h.len() - FIXED_LEN) as u16;
        h[14..16].copy_from_slice(&len.to_be_bytes());
        assert!(
            matches!(parse(&h), Ok(Header::Proxied { source, .. }) if source == sa("198.51.100.1:1"))
        );
    }

    #[test]
    fn http_and_prefixes_are_told_apart() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniff::NotProxy);
        assert_eq!(sniff(b"\r\n\r\nX"), Sniff::NotProxy);
        assert_eq!(sniff(b""), Sniff::NeedMore);
        assert_eq!(sniff(b"\r\n\r\n\0"), Sniff::NeedMore);
        assert_eq!(sniff(&SIGNATURE), Sniff::NeedMore);
        // Version 1 (text) is not version 2.
        assert_eq!(
            sniff(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
            Sniff::NotProxy
        );
    }

    #[test]
    fn malformed_headers_are_typed_errors() {
        let good = encode(Some((sa("203.0.113.7:1"), sa("10.0.0.2:2"))));
        // Truncated anywhere.
        for cut in 0..good.len() {
            let e = parse(&good[..cut]).unwrap_err();
            assert!(matches!(e, ProxyError::Truncated { .. }), "{cut}: {e}");
        }
        let with = |at: usize, byte: u8| {
            let mut h = good.clone();
            h[at] = byte;
            parse(&h)
        };
        assert_eq!(with(0, b'X'), Err(ProxyError::Signature));
        assert_eq!(with(12, 0x11), Err(ProxyError::Version(1)));
        assert_eq!(with(12, 0x2f), Err(ProxyError::Command(0xf)));
        assert_eq!(with(13, 0x41), Err(ProxyError::Family(0x41)));
        // A length too short for the family's addresses.
        let mut short = good[..FIXED_LEN + 4].to_vec();
        short[14..16].copy_from_slice(&4u16.to_be_bytes());
        assert!(matches!(
            parse(&short),
            Err(ProxyError::AddressLength { need: 12, .. })
        ));
        // IPv6 family with IPv4-sized addresses.
        let mut mixed = good.clone();
        mixed[13] = 0x21;
        assert!(matches!(
            parse(&mixed),
            Err(ProxyError::AddressLength { need: 36, .. })
        ));
        // An absurd length is refused before anything is buffered.
        let mut long = good.clone();
        long[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(sniff(&long), Sniff::Header { len: 16 + 65535 });
        assert_eq!(parse(&long), Err(ProxyError::TooLong(16 + 65535)));
        // UNSPEC and UNIX: consumed, no address.
        assert_eq!(with(13, 0x00), Ok(Header::Unspecified));
        assert_eq!(with(13, 0x31), Ok(Header::Unspecified));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix of many byte strings.
        let mut x: u32 = 0x1234_5678;
        for _ in 0..2000 {
            let mut h = encode(Some((sa("1.2.3.4:5"), sa("6.7.8.9:10"))));
            for b in h.iter_mut().skip(12) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if x.is_multiple_of(3) {
                    *b = x as u8;
                }
            }
            for cut in 0..=h.len() {
                let _ = sniff(&h[..cut]);
                let _ = parse(&h[..cut]);
            }
        }
    }
}
