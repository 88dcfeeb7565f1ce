//! HS256 tokens: issue (`tether token USER`) and verify (every request).
//!
//! Hand-written over `hmac` + `sha2` rather than a JWT crate because the
//! contract pins one algorithm and the checks are few and must be exact:
//! the header must say `HS256` (so `alg: none` and algorithm confusion are
//! refused before any signature work), the signature is compared in
//! constant time, `exp` is required and in the future, and `sub` is 1 to 64
//! characters of `[A-Za-z0-9_.@-]`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::time::{SystemTime, UNIX_EPOCH};

type HmacSha256 = Hmac<Sha256>;

/// Why a token was refused. Every variant is answered with HTTP 401; the
/// variant only goes to the log (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("unsupported algorithm (only HS256 is accepted)")]
    Algorithm,
    #[error("bad signature")]
    Signature,
    #[error("token has no exp")]
    NoExpiry,
    #[error("token expired")]
    Expired,
    #[error("invalid sub (1-64 chars of [A-Za-z0-9_.@-])")]
    Subject,
}

/// The signing key. Never printed: `Debug` shows only its length.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(bytes.into())
    }

    /// A fresh random secret, hex encoded (for dev mode).
    pub fn generate_hex() -> String {
        let mut buf = [0u8; 32];
        getrandom::fill(&mut buf).expect("the OS random source failed");
        buf.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC accepts keys of any length")
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<serde_json::Value>,
}

/// Whether `user` is a valid user id: 1 to 64 of `[A-Za-z0-9_.@-]`.
pub fn valid_user_id(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// HMAC-SHA256 of `data` under `key` (the JWT signature primitive; tests
/// use it to forge tokens with arbitrary headers).
pub fn hs256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Secret::new(key.to_vec()).mac();
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Issues a token for `user` valid for `ttl_secs` seconds.
pub fn issue(secret: &Secret, user: &str, ttl_secs: u64) -> Result<String, AuthError> {
    if !valid_user_id(user) {
        return Err(AuthError::Subject);
    }
    issue_raw(secret, user, now_secs().saturating_add(ttl_secs))
}

/// Issues a token with an explicit `exp` (tests use it for expired tokens).
pub fn issue_raw(secret: &Secret, user: &str, exp: u64) -> Result<String, AuthError> {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = serde_json::json!({ "sub": user, "exp": exp });
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{payload}");
    let mut mac = secret.mac();
    mac.update(signing_input.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    Ok(format!("{signing_input}.{sig}"))
}

/// The `exp` claim of a token, read without verifying it: what a client
/// needs to decide when to fetch a new one (the server verifies).
pub fn unverified_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_u64()
}

/// Verifies `token` and returns its user id.
pub fn verify(secret: &Secret, token: &str) -> Result<String, AuthError> {
    verify_at(secret, token, now_secs())
}

/// [`verify`] at a given time (seconds since the epoch).
pub fn verify_at(secret: &Secret, token: &str, now: u64) -> Result<String, AuthError> {
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    if token.len() > 4096 {
        return Err(AuthError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let header_bytes = URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|_| AuthError::Malformed)?;
    let header: Header = serde_json::from_slice(&header_bytes).map_err(|_| AuthError::Malformed)?;
    if header.alg != "HS256" {
        return Err(AuthError::Algorithm);
    }
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| AuthError::Malformed)?;
    let mut mac = secret.mac();
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(p.as_bytes());
    // verify_slice compares in constant time.
    mac.verify_slice(&sig).map_err(|_| AuthError::Signature)?;
    let claims_bytes = URL_SAFE_NO_PAD
        .decode(p)
        .map_err(|_| AuthError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&claims_bytes).map_err(|_| AuthError::Malformed)?;
    let exp = match claims.exp {
        None | Some(serde_json::Value::Null) => return Err(AuthError::NoExpiry),
        Some(v) => v.as_u64().ok_or(AuthError::Malformed)?,
    };
    if exp <= now {
        return Err(AuthError::Expired);
    }
    let sub = claims.sub.ok_or(AuthError::Subject)?;
    if !valid_user_id(&sub) {
        return Err(AuthError::Subject);
    }
    Ok(sub)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forge(header: &str, claims: &str, key: &[u8]) -> String {
        let h = URL_SAFE_NO_PAD.encode(header);
        let p = URL_SAFE_NO_PAD.encode(claims);
        let mut mac = HmacSha256::new_from_slice(key).unwrap();
        mac.update(format!("{h}.{p}").as_bytes());
        let s = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{h}.{p}.{s}")
    }

    #[test]
    fn round_trip_and_every_refusal() {
        let secret = Secret::new(b"k".to_vec());
        let t = issue(&secret, "alice@x.y", 60).unwrap();
        assert_eq!(verify(&secret, &t).unwrap(), "alice@x.y");
        assert_eq!(
            verify(&Secret::new(b"other".to_vec()), &t),
            Err(AuthError::Signature)
        );
        assert_eq!(verify(&secret, ""), Err(AuthError::Missing));
        assert_eq!(verify(&secret, "a.b"), Err(AuthError::Malformed));
        let expired = issue_raw(&secret, "alice", 10).unwrap();
        assert_eq!(verify(&secret, &expired), Err(AuthError::Expired));
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(r#"{"sub":"alice","exp":99999999999}"#)
        );
        assert_eq!(verify(&secret, &none), Err(AuthError::Algorithm));
        let hs512 = forge(
            r#"{"alg":"HS512"}"#,
            r#"{"sub":"a","exp":99999999999}"#,
            b"k",
        );
        assert_eq!(verify(&secret, &hs512), Err(AuthError::Algorithm));
        let no_exp = forge(r#"{"alg":"HS256"}"#, r#"{"sub":"a"}"#, b"k");
        assert_eq!(verify(&secret, &no_exp), Err(AuthError::NoExpiry));
        let no_sub = forge(r#"{"alg":"HS256"}"#, r#"{"exp":99999999999}"#, b"k");
        assert_eq!(verify(&secret, &no_sub), Err(AuthError::Subject));
        let bad_sub = forge(
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"a b","exp":99999999999}"#,
            b"k",
        );
        assert_eq!(verify(&secret, &bad_sub), Err(AuthError::Subject));
        let big_exp = forge(r#"{"alg":"HS256"}"#, r#"{"sub":"a","exp":1e400}"#, b"k");
        assert!(verify(&secret, &big_exp).is_err());
        assert!(issue(&secret, "", 10).is_err());
        assert!(issue(&secret, &"x".repeat(65), 10).is_err());
    }

    #[test]
    fn unverified_exp_reads_the_claim() {
        let t = issue_raw(&Secret::new(b"k".to_vec()), "alice", 12345).unwrap();
        assert_eq!(unverified_exp(&t), Some(12345));
        assert_eq!(unverified_exp("not.a-token"), None);
        assert_eq!(unverified_exp(""), None);
    }
}
