//! Tokens of an identity provider, for tests/abuse.rs: RS256 and ES256
//! under `--token-public-key`, `nbf`, `iss`, `aud`, and the rejections
//! (alg none, algorithm confusion, expiry, tampering, an unusable key).

use super::*;

mod idp {
    //! An identity provider of the test's own: key pairs made here, never
    //! stored anywhere but a temp dir.
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};

    pub struct Idp {
        pub alg: Algorithm,
        private: EncodingKey,
        pub public_pem: String,
    }

    impl Idp {
        pub fn rsa() -> Idp {
            let private = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
            let pem = private.to_pkcs8_pem(LineEnding::LF).unwrap();
            Idp {
                alg: Algorithm::RS256,
                private: EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
                public_pem: private
                    .to_public_key()
                    .to_public_key_pem(LineEnding::LF)
                    .unwrap(),
            }
        }

        pub fn ec() -> Idp {
            let private = p256::SecretKey::random(&mut rand_core::OsRng);
            let pem = private.to_pkcs8_pem(LineEnding::LF).unwrap();
            Idp {
                alg: Algorithm::ES256,
                private: EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
                public_pem: private
                    .public_key()
                    .to_public_key_pem(LineEnding::LF)
                    .unwrap(),
            }
        }

        pub fn sign(&self, claims: serde_json::Value) -> String {
            encode(&Header::new(self.alg), &claims, &self.private).unwrap()
        }
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token with any header and claims, HMAC-signed with `key`.
fn forge(header: &str, claims: &Value, key: &[u8]) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let h = URL_SAFE_NO_PAD.encode(header);
    let p = URL_SAFE_NO_PAD.encode(claims.to_string());
    let s = URL_SAFE_NO_PAD.encode(tether_protocol::auth::hs256(
        key,
        format!("{h}.{p}").as_bytes(),
    ));
    format!("{h}.{p}.{s}")
}

async fn status_with(addr: SocketAddr, token: &str) -> u16 {
    http(addr, "GET", "/v1/conversations", Some(token), None)
        .await
        .status
}

async fn hello_user(ws_url: &str, token: &str) -> Result<String, ConnectError> {
    let (mut c, _) = WsClient::connect_with_subprotocol(ws_url, token).await?;
    match c.next_event(T).await {
        WsEvent::Json(v) if v["type"] == "hello" => Ok(v["user"].as_str().unwrap().to_string()),
        other => Err(ConnectError::Other(format!("{other:?}"))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_es256_tokens_of_an_identity_provider() {
    let db = TestDb::new_async().await;
    let keys = tempfile::tempdir().unwrap();
    let (rsa, ec) = (idp::Idp::rsa(), idp::Idp::ec());
    let rsa_path = keys.path().join("idp-rsa.pem");
    let ec_path = keys.path().join("idp-ec.pem");
    std::fs::write(&rsa_path, &rsa.public_pem).unwrap();
    std::fs::write(&ec_path, &ec.public_pem).unwrap();
    let a = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &["--token-public-key", rsa_path.to_str().unwrap()],
        &[],
    );
    let b = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &[],
        &[
            ("TETHER_TOKEN_PUBLIC_KEY", ec_path.to_str().unwrap()),
            ("TETHER_TOKEN_ISSUER", "https://idp.test"),
            ("TETHER_TOKEN_AUDIENCE", "tether"),
        ],
    );
    let exp = now() + 3600;
    // A: RS256 over REST and WebSocket; our own HS256 still works.
    let alice = rsa.sign(json!({"sub": "alice", "exp": exp}));
    assert_eq!(status_with(a.addr(), &alice).await, 200);
    assert_eq!(hello_user(&a.ws_url(), &alice).await.unwrap(), "alice");
    assert_eq!(status_with(a.addr(), &tok("bob")).await, 200);
    let refused = [
        (
            "expired",
            rsa.sign(json!({"sub": "alice", "exp": now() - 10})),
        ),
        (
            "nbf in the future",
            rsa.sign(json!({"sub": "alice", "exp": exp, "nbf": exp - 60})),
        ),
        ("no exp", rsa.sign(json!({"sub": "alice"}))),
        (
            "ES256 without its key",
            ec.sign(json!({"sub": "alice", "exp": exp})),
        ),
        (
            "HS256 signed with the public key",
            forge(
                r#"{"alg":"HS256","typ":"JWT"}"#,
                &json!({"sub": "mallory", "exp": exp}),
                rsa.public_pem.as_bytes(),
            ),
        ),
        ("alg none", {
            let t = forge(
                r#"{"alg":"none"}"#,
                &json!({"sub": "mallory", "exp": exp}),
                b"",
            );
            format!("{}.", t.rsplit_once('.').unwrap().0)
        }),
        ("a tampered RS256 token", {
            let mut parts: Vec<String> = alice.split('.').map(str::to_owned).collect();
            parts[1] = forge("{}", &json!({"sub": "mallory", "exp": exp}), b"")
                .split('.')
                .nth(1)
                .unwrap()
                .to_string();
            parts.join(".")
        }),
    ];
    for (what, t) in &refused {
        assert_eq!(status_with(a.addr(), t).await, 401, "{what}");
        let ws = WsClient::connect(&a.ws_url(), t).await;
        assert_eq!(ws.err().and_then(|e| e.status()), Some(401), "{what}");
    }
    // B: ES256 with the issuer and audience it requires.
    let good =
        ec.sign(json!({"sub": "carol", "exp": exp, "iss": "https://idp.test", "aud": "tether"}));
    assert_eq!(status_with(b.addr(), &good).await, 200);
    assert_eq!(hello_user(&b.ws_url(), &good).await.unwrap(), "carol");
    for (what, claims) in [
        (
            "wrong audience",
            json!({"sub": "carol", "exp": exp, "iss": "https://idp.test", "aud": "other"}),
        ),
        (
            "no issuer",
            json!({"sub": "carol", "exp": exp, "aud": "tether"}),
        ),
        (
            "wrong issuer",
            json!({"sub": "carol", "exp": exp, "iss": "https://evil.test", "aud": "tether"}),
        ),
    ] {
        assert_eq!(status_with(b.addr(), &ec.sign(claims)).await, 401, "{what}");
    }
    // The RS256 key is not B's.
    assert_eq!(status_with(b.addr(), &alice).await, 401);

    // A key that cannot be used stops the start, with one line.
    let not_a_key = keys.path().join("not-a-key.pem");
    std::fs::write(
        &not_a_key,
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    for path in [Path::new("/nonexistent/idp.pem"), not_a_key.as_path()] {
        for bin in [
            env!("CARGO_BIN_EXE_tether-worker"),
            env!("CARGO_BIN_EXE_tether"),
        ] {
            let mut c = Command::new(bin);
            c.args([
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                "postgres://127.0.0.1:1/x",
            ])
            .args(["--secret", TEST_SECRET, "--token-public-key"])
            .arg(path);
            let (code, out) = run_to_exit("bad-key", c);
            assert_eq!(code, Some(2), "{bin} {}: {out}", path.display());
            assert!(out.contains("TETHER_TOKEN_PUBLIC_KEY"), "{out}");
        }
    }
}
