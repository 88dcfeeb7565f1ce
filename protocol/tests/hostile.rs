//! Property tests of the parsers that face the network: the WebSocket
//! frame decoder and the token verifier. Whatever bytes arrive, they return
//! an error that names the problem, never panic, and never accept what they
//! should not. Bounded (a few thousand cases), so they run in CI.

use proptest::prelude::*;
use tether_protocol::auth::{self, AuthError, Secret};
use tether_protocol::frames::ClientFrame;

const CODES: &[&str] = &["bad_frame", "unknown_type", "invalid_field"];

/// Arbitrary JSON values, nested a few levels, with hostile leaves.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(serde_json::Value::Number)
            .unwrap_or_default()),
        ".{0,40}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::from("\u{0}\u{7}\u{ffff}")),
        Just(serde_json::Value::from("x".repeat(10_000))),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("type".to_string()),
                    Just("conversation_id".to_string()),
                    Just("seq".to_string()),
                    Just("body".to_string()),
                    Just("client_msg_id".to_string()),
                    "[a-z_]{1,12}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Frames shaped like real ones, with one field of each made hostile.
fn near_frame() -> impl Strategy<Value = serde_json::Value> {
    (
        prop_oneof![Just("send"), Just("ack"), Just("ping"), Just("typing"), Just("SEND"), Just("")],
        json_value(),
        json_value(),
        json_value(),
    )
        .prop_map(|(t, c, b, m)| {
            serde_json::json!({"type": t, "conversation_id": c, "seq": b.clone(), "body": b, "client_msg_id": m})
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_text_parses_or_names_its_error(text in ".{0,200}") {
        if let Err(e) = ClientFrame::parse(&text) {
            prop_assert!(CODES.contains(&e.code), "{}", e.code);
            prop_assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn any_json_parses_or_names_its_error(v in json_value()) {
        check(&v.to_string())?;
    }

    #[test]
    fn near_frames_are_validated(v in near_frame()) {
        check(&v.to_string())?;
    }

    #[test]
    fn any_token_string_is_refused(t in ".{0,300}") {
        let secret = Secret::new(b"k".to_vec());
        prop_assert!(auth::verify(&secret, &t).is_err());
    }

    #[test]
    fn a_tampered_token_is_refused(user in "[A-Za-z0-9_.@-]{1,64}", pos in 0usize..400, byte in any::<u8>()) {
        let secret = Secret::new(b"k".to_vec());
        let good = auth::issue(&secret, &user, 3600).unwrap();
        prop_assert_eq!(auth::verify(&secret, &good).unwrap(), user);
        let mut bytes = good.clone().into_bytes();
        let i = pos % bytes.len();
        if bytes[i] != byte {
            bytes[i] = byte;
            let tampered = String::from_utf8_lossy(&bytes).into_owned();
            if tampered != good {
                let r = auth::verify(&secret, &tampered);
                // Flipping a byte may leave a base64 character that decodes
                // to the same bits (the last character's padding bits); the
                // only acceptable success is the identical claims.
                if let Ok(u) = r {
                    prop_assert_eq!(u, good_user(&good));
                } else {
                    prop_assert!(matches!(
                        r,
                        Err(AuthError::Malformed | AuthError::Signature | AuthError::Algorithm | AuthError::Subject | AuthError::NoExpiry | AuthError::Expired)
                    ));
                }
            }
        }
    }
}

fn good_user(token: &str) -> String {
    auth::verify(&Secret::new(b"k".to_vec()), token).unwrap()
}

/// A frame either parses into something valid, or is refused with a code.
fn check(text: &str) -> Result<(), TestCaseError> {
    match ClientFrame::parse(text) {
        Ok(ClientFrame::Send {
            conversation_id,
            client_msg_id,
            ..
        }) => {
            prop_assert!(conversation_id > 0);
            prop_assert!(!client_msg_id.is_empty() && client_msg_id.len() <= 128);
            prop_assert!(!client_msg_id.chars().any(char::is_control));
        }
        Ok(ClientFrame::Ack {
            conversation_id,
            seq,
        }) => {
            prop_assert!(conversation_id > 0 && seq >= 0);
        }
        Ok(ClientFrame::Typing { conversation_id }) => {
            prop_assert!(conversation_id > 0);
        }
        Ok(ClientFrame::Ping) => {}
        Err(e) => prop_assert!(CODES.contains(&e.code), "{}", e.code),
    }
    Ok(())
}
