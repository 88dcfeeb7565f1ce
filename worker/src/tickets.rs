//! One-time tickets for `GET /v1/sse?ticket=…`: an `EventSource` cannot
//! set headers, and a token in a URL lands in proxy logs, so a client
//! trades its token (`POST /v1/sse/tickets`, Bearer) for a ticket that is
//! worth one stream, for [`TTL`], and nothing else.
//!
//! A ticket is signed, not stored: `<id>.<expires_ms>.<hex user>.<mac>`,
//! the MAC an HMAC-SHA256 under a key derived from the token secret, so
//! any worker of any host sharing the secret can check it without asking
//! the issuer. Use exactly once is the one thing a signature cannot say:
//! the worker that accepts a ticket records its id in the database
//! (`store::redeem_ticket`), and the record is what refuses a second use,
//! on this worker or any other. Pure here: issuing and checking.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::Duration;

type HmacSha256 = Hmac<Sha256>;

/// How long a ticket is valid after it is issued.
pub const TTL: Duration = Duration::from_secs(30);

/// The key tickets are signed with, derived from the token secret (one
/// secret, a key per purpose).
#[derive(Clone)]
pub struct TicketKey([u8; 32]);

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketKey(..)")
    }
}

/// A checked ticket: whose it is, and what records its use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// 128 random bits, hex: the key of its use record.
    pub id: String,
    pub user: String,
    pub expires_ms: u64,
}

/// Why a ticket is refused (all are 401 to the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("malformed ticket")]
    Malformed,
    #[error("ticket signature invalid")]
    BadSignature,
    #[error("ticket expired")]
    Expired,
    #[error("ticket already used")]
    Used,
}

impl TicketKey {
    pub fn derive(secret: &[u8]) -> TicketKey {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(b"tether sse ticket v1");
        TicketKey(mac.finalize().into_bytes().into())
    }

    fn mac(&self, signed: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(signed.as_bytes());
        mac
    }

    /// A ticket for `user` with id `id`, valid until `expires_ms` (unix
    /// milliseconds). [`TicketKey::issue`] picks the id and expiry; this
    /// form is for tests that need an expired one.
    pub fn issue_raw(&self, id: &str, user: &str, expires_ms: u64) -> String {
        let signed = format!("{id}.{expires_ms}.{}", hex(user.as_bytes()));
        let tag = hex(&self.mac(&signed).finalize().into_bytes());
        format!("{signed}.{tag}")
    }

    /// A fresh ticket for `user`, valid for [`TTL`] from `now_ms`; `None`
    /// without randomness.
    pub fn issue(&self, user: &str, now_ms: u64) -> Option<String> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).ok()?;
        Some(self.issue_raw(&hex(&id), user, now_ms + TTL.as_millis() as u64))
    }

    /// Checks signature and expiry (use is checked by the store). Never
    /// panics, whatever the input.
    pub fn check(&self, ticket: &str, now_ms: u64) -> Result<Ticket, TicketError> {
        let (signed, tag) = ticket.rsplit_once('.').ok_or(TicketError::Malformed)?;
        let mut parts = signed.split('.');
        let (Some(id), Some(expires), Some(user), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TicketError::Malformed);
        };
        let valid_id = id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
        let tag = unhex(tag).ok_or(TicketError::Malformed)?;
        if !valid_id {
            return Err(TicketError::Malformed);
        }
        self.mac(signed)
            .verify_slice(&tag)
            .map_err(|_| TicketError::BadSignature)?;
        let expires_ms: u64 = expires.parse().map_err(|_| TicketError::Malformed)?;
        if now_ms >= expires_ms {
            return Err(TicketError::Expired);
        }
        let user = unhex(user)
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or(TicketError::Malformed)?;
        Ok(Ticket {
            id: id.to_ascii_lowercase(),
            user,
            expires_ms,
        })
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 512 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> TicketKey {
        TicketKey::derive(b"0123456789abcdef0123456789abcdef")
    }

    #[test]
    fn a_ticket_names_its_user_until_it_expires() {
        let t = key().issue("alice@x.y", 1_000).unwrap();
        let got = key().check(&t, 1_000 + 29_999).unwrap();
        assert_eq!((got.user.as_str(), got.expires_ms), ("alice@x.y", 31_000));
        assert_eq!(got.id.len(), 32);
        assert_eq!(key().check(&t, 31_000), Err(TicketError::Expired));
    }

    #[test]
    fn forged_and_altered_tickets_are_refused() {
        let t = key().issue("alice", 0).unwrap();
        let other = TicketKey::derive(b"another secret of thirty-two byte");
        assert_eq!(other.check(&t, 1), Err(TicketError::BadSignature));
        // Another user, or a later expiry, under the same MAC.
        let (signed, tag) = t.rsplit_once('.').unwrap();
        let parts: Vec<&str> = signed.split('.').collect();
        let as_bob = format!("{}.{}.{}.{tag}", parts[0], parts[1], hex(b"bob"));
        assert_eq!(key().check(&as_bob, 1), Err(TicketError::BadSignature));
        let later = format!("{}.99999999999.{}.{tag}", parts[0], parts[2]);
        assert_eq!(key().check(&later, 1), Err(TicketError::BadSignature));
        for bad in ["", ".", "a.b.c.d", "x", &format!("{t}.x"), "zz.1.61.00"] {
            assert!(key().check(bad, 1).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn checking_never_panics(s in ".{0,200}") {
            let _ = key().check(&s, 1);
        }
    }
}
