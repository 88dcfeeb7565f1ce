//! Tokens: issue (`tether token USER`, HS256) and verify (every request:
//! HS256 under the shared secret, and RS256 or ES256 under an identity
//! provider's public key when one is configured); what makes a secret
//! strong enough to sign with ([`check_secret`], [`Secret::generate_hex`]).
//!
//! Signatures are checked by `jsonwebtoken` (RustCrypto backend: no
//! OpenSSL). The rules around it stay ours and exact: the header's `alg`
//! must be one this verifier was configured for (so `alg: none`, HS512 and
//! algorithm confusion, an HS256 token "signed" with the public key, are
//! refused: HS256 is only ever checked against the secret), `exp` is
//! required and in the future, `nbf` (when present) not in the future,
//! `iss` and `aud` match when configured, and `sub` is 1 to 64 characters
//! of `[A-Za-z0-9_.@-]`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
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
    #[error("unsupported algorithm")]
    Algorithm,
    #[error("bad signature")]
    Signature,
    #[error("token has no exp")]
    NoExpiry,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("wrong issuer")]
    Issuer,
    #[error("wrong audience")]
    Audience,
    #[error("invalid sub (1-64 chars of [A-Za-z0-9_.@-])")]
    Subject,
}

/// Shortest secret accepted (bytes).
pub const MIN_SECRET_BYTES: usize = 32;

/// Values that people paste from examples and documentation: refused
/// whatever their length (compared without case).
pub const PLACEHOLDER_SECRETS: &[&str] = &[
    "CHANGE-ME",
    "changeme",
    "change-me",
    "change_me",
    "secret",
    "password",
    "tether-secret",
    "your-secret-here",
];

/// Why a secret is refused at start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeakSecret {
    #[error("is empty")]
    Empty,
    #[error("is a placeholder, not a key")]
    Placeholder,
    #[error("is {0} bytes; at least {MIN_SECRET_BYTES} are needed")]
    TooShort(usize),
}

/// Whether `secret` may sign tokens: at least [`MIN_SECRET_BYTES`] bytes,
/// not a known placeholder.
pub fn check_secret(secret: &str) -> Result<(), WeakSecret> {
    if secret.is_empty() {
        return Err(WeakSecret::Empty);
    }
    let trimmed = secret.trim();
    if PLACEHOLDER_SECRETS
        .iter()
        .any(|p| p.eq_ignore_ascii_case(trimmed))
    {
        return Err(WeakSecret::Placeholder);
    }
    if secret.len() < MIN_SECRET_BYTES {
        return Err(WeakSecret::TooShort(secret.len()));
    }
    Ok(())
}

/// The one line printed when the secret is refused: names the variable
/// and says how to make a good one (never the value).
pub fn weak_secret_message(e: &WeakSecret) -> String {
    format!(
        "TETHER_SECRET (--secret) {e}: set it to a random key of at least \
         {MIN_SECRET_BYTES} bytes, e.g. the output of `tether secret`"
    )
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

    /// A fresh random secret: 32 random bytes, hex encoded (`tether
    /// secret`, dev mode).
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

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<serde_json::Value>,
    #[serde(default)]
    nbf: Option<serde_json::Value>,
    #[serde(default)]
    iss: Option<serde_json::Value>,
    #[serde(default)]
    aud: Option<serde_json::Value>,
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

/// Why a public key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} holds no RSA or EC (P-256) public key in PEM")]
    NotAKey(String),
}

/// An identity provider's public key and the algorithm it verifies.
#[derive(Clone)]
pub struct PublicKey {
    alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({:?})", self.alg)
    }
}

impl PublicKey {
    /// An RSA public key (RS256) or an EC P-256 one (ES256), in PEM.
    pub fn from_pem(pem: &[u8], what: &str) -> Result<PublicKey, KeyError> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(PublicKey {
                alg: Algorithm::RS256,
                key,
            });
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            return Ok(PublicKey {
                alg: Algorithm::ES256,
                key,
            });
        }
        Err(KeyError::NotAKey(what.to_string()))
    }

    /// [`PublicKey::from_pem`] of a file.
    pub fn from_file(path: &std::path::Path) -> Result<PublicKey, KeyError> {
        let pem = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        PublicKey::from_pem(&pem, &path.display().to_string())
    }

    /// `RS256` or `ES256`.
    pub fn algorithm(&self) -> &'static str {
        match self.alg {
            Algorithm::RS256 => "RS256",
            _ => "ES256",
        }
    }
}

/// Checks every token: HS256 under the secret, and RS256/ES256 under the
/// public key when one is set; `iss`/`aud` when set.
#[derive(Clone, Debug)]
pub struct Verifier {
    secret: Secret,
    public: Option<PublicKey>,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Verifier {
    /// HS256 under `secret` only.
    pub fn hs256(secret: Secret) -> Verifier {
        Verifier {
            secret,
            public: None,
            issuer: None,
            audience: None,
        }
    }

    /// Also accepts tokens signed by the holder of `key`'s private key.
    pub fn with_public_key(mut self, key: Option<PublicKey>) -> Verifier {
        self.public = key;
        self
    }

    /// Requires `iss` to be `issuer` (when `Some`).
    pub fn with_issuer(mut self, issuer: Option<String>) -> Verifier {
        self.issuer = issuer;
        self
    }

    /// Requires `aud` to be, or contain, `audience` (when `Some`).
    pub fn with_audience(mut self, audience: Option<String>) -> Verifier {
        self.audience = audience;
        self
    }

    /// Verifies `token` and returns its user id.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        self.verify_at(token, now_secs())
    }

    /// [`Verifier::verify`] at a given time (seconds since the epoch).
    pub fn verify_at(&self, token: &str, now: u64) -> Result<String, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > 8192 {
            return Err(AuthError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let header_bytes = URL_SAFE_NO_PAD
            .decode(h)
            .map_err(|_| AuthError::Malformed)?;
        let header: Header =
            serde_json::from_slice(&header_bytes).map_err(|_| AuthError::Malformed)?;
        // The key follows from the algorithm, and HS256 only ever from the
        // secret: a token cannot choose to be checked with the public key
        // as an HMAC key.
        let hs_key;
        let (alg, key) = match (header.alg.as_str(), &self.public) {
            ("HS256", _) => {
                hs_key = DecodingKey::from_secret(&self.secret.0);
                (Algorithm::HS256, &hs_key)
            }
            ("RS256", Some(p)) if p.alg == Algorithm::RS256 => (p.alg, &p.key),
            ("ES256", Some(p)) if p.alg == Algorithm::ES256 => (p.alg, &p.key),
            _ => return Err(AuthError::Algorithm),
        };
        let mut validation = Validation::new(alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.leeway = 0;
        let data = jsonwebtoken::decode::<serde_json::Value>(token, key, &validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => AuthError::Signature,
                jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => AuthError::Algorithm,
                _ => AuthError::Malformed,
            },
        )?;
        let claims: Claims =
            serde_json::from_value(data.claims).map_err(|_| AuthError::Malformed)?;
        self.check_claims(claims, now)
    }

    fn check_claims(&self, claims: Claims, now: u64) -> Result<String, AuthError> {
        let exp = match claims.exp {
            None | Some(serde_json::Value::Null) => return Err(AuthError::NoExpiry),
            Some(v) => v.as_u64().ok_or(AuthError::Malformed)?,
        };
        if exp <= now {
            return Err(AuthError::Expired);
        }
        match claims.nbf {
            None | Some(serde_json::Value::Null) => {}
            Some(v) => {
                if v.as_u64().ok_or(AuthError::Malformed)? > now {
                    return Err(AuthError::NotYetValid);
                }
            }
        }
        if let Some(want) = &self.issuer {
            if claims.iss.as_ref().and_then(|v| v.as_str()) != Some(want.as_str()) {
                return Err(AuthError::Issuer);
            }
        }
        if let Some(want) = &self.audience {
            let ok = match &claims.aud {
                Some(serde_json::Value::String(s)) => s == want,
                Some(serde_json::Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(want)),
                _ => false,
            };
            if !ok {
                return Err(AuthError::Audience);
            }
        }
        let sub = claims.sub.ok_or(AuthError::Subject)?;
        if !valid_user_id(&sub) {
            return Err(AuthError::Subject);
        }
        Ok(sub)
    }
}

/// Verifies an HS256 `token` under `secret` and returns its user id.
pub fn verify(secret: &Secret, token: &str) -> Result<String, AuthError> {
    Verifier::hs256(secret.clone()).verify(token)
}

/// [`verify`] at a given time (seconds since the epoch).
pub fn verify_at(secret: &Secret, token: &str, now: u64) -> Result<String, AuthError> {
    Verifier::hs256(secret.clone()).verify_at(token, now)
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

#[cfg(test)]
mod asymmetric_tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header as JwtHeader};
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};

    fn far() -> u64 {
        now_secs() + 3600
    }

    fn rsa_pair() -> (String, String) {
        let private = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
        let public = private.to_public_key();
        (
            private.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
            public.to_public_key_pem(LineEnding::LF).unwrap(),
        )
    }

    fn ec_pair() -> (String, String) {
        let private = p256::SecretKey::random(&mut rand_core::OsRng);
        (
            private.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
            private
                .public_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap(),
        )
    }

    fn sign(alg: Algorithm, private_pem: &str, claims: serde_json::Value) -> String {
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap(),
            _ => EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap(),
        };
        encode(&JwtHeader::new(alg), &claims, &key).unwrap()
    }

    #[test]
    fn weak_secrets_are_named() {
        assert_eq!(check_secret(""), Err(WeakSecret::Empty));
        assert_eq!(check_secret("change-me"), Err(WeakSecret::Placeholder));
        assert_eq!(check_secret("CHANGE-ME"), Err(WeakSecret::Placeholder));
        assert_eq!(check_secret("Password"), Err(WeakSecret::Placeholder));
        assert_eq!(check_secret(&"k".repeat(31)), Err(WeakSecret::TooShort(31)));
        assert!(check_secret(&Secret::generate_hex()).is_ok());
        assert_eq!(Secret::generate_hex().len(), 64);
        let line = weak_secret_message(&WeakSecret::TooShort(3));
        assert!(line.contains("TETHER_SECRET") && line.contains("tether secret"));
    }

    #[test]
    fn rs256_and_es256_verify_with_the_public_key_only() {
        let secret = Secret::new(Secret::generate_hex().into_bytes());
        for (alg, (private, public)) in [
            (Algorithm::RS256, rsa_pair()),
            (Algorithm::ES256, ec_pair()),
        ] {
            let key = PublicKey::from_pem(public.as_bytes(), "test").unwrap();
            let v = Verifier::hs256(secret.clone()).with_public_key(Some(key));
            let t = sign(
                alg,
                &private,
                serde_json::json!({"sub":"alice","exp":far()}),
            );
            assert_eq!(v.verify(&t).unwrap(), "alice", "{alg:?}");
            // Without the key configured, the algorithm is refused.
            assert_eq!(
                Verifier::hs256(secret.clone()).verify(&t),
                Err(AuthError::Algorithm)
            );
            // Algorithm confusion: HS256 "signed" with the public key's PEM.
            let confused = {
                let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
                let p = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"mallory","exp":{}}}"#, far()));
                let s =
                    URL_SAFE_NO_PAD.encode(hs256(public.as_bytes(), format!("{h}.{p}").as_bytes()));
                format!("{h}.{p}.{s}")
            };
            assert_eq!(v.verify(&confused), Err(AuthError::Signature));
            // nbf in the future, expired, tampered.
            let early = sign(
                alg,
                &private,
                serde_json::json!({"sub":"a","exp":far(),"nbf":far()}),
            );
            assert_eq!(v.verify(&early), Err(AuthError::NotYetValid));
            let old = sign(alg, &private, serde_json::json!({"sub":"a","exp":10}));
            assert_eq!(v.verify(&old), Err(AuthError::Expired));
            let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
            parts[1] = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"mallory","exp":{}}}"#, far()));
            assert_eq!(v.verify(&parts.join(".")), Err(AuthError::Signature));
        }
    }

    #[test]
    fn issuer_and_audience_are_checked_when_set() {
        let (private, public) = ec_pair();
        let key = PublicKey::from_pem(public.as_bytes(), "test").unwrap();
        let v = Verifier::hs256(Secret::new(Secret::generate_hex().into_bytes()))
            .with_public_key(Some(key))
            .with_issuer(Some("https://idp.example".into()))
            .with_audience(Some("tether".into()));
        let t = |c: serde_json::Value| sign(Algorithm::ES256, &private, c);
        let exp = far();
        let good = t(
            serde_json::json!({"sub":"a","exp":exp,"iss":"https://idp.example","aud":["x","tether"]}),
        );
        assert_eq!(v.verify(&good).unwrap(), "a");
        let bad_iss = t(serde_json::json!({"sub":"a","exp":exp,"iss":"evil","aud":"tether"}));
        assert_eq!(v.verify(&bad_iss), Err(AuthError::Issuer));
        let no_aud = t(serde_json::json!({"sub":"a","exp":exp,"iss":"https://idp.example"}));
        assert_eq!(v.verify(&no_aud), Err(AuthError::Audience));
        assert!(PublicKey::from_pem(b"not a key", "x").is_err());
    }
}
