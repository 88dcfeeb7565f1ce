//! The codec of [`SIGNAL_CHANNEL`]: presence changes, typing and read
//! receipts, crossing workers and hosts as NOTIFY payloads.
//!
//! A payload is untrusted input (any role that can connect may NOTIFY):
//! it is authenticated like the event notifications (the first line is
//! `a <unix_ms> <hex HMAC>`, see `crate::store::notice`), and an
//! unauthenticated one is dropped whole — signals carry content, and
//! nothing in the log could stand in for them. Body lines:
//!
//! - `p <1|0> <last_seen> <user>`: the user went online (1) or offline (0);
//! - `t <conversation> <user>`: the user is typing;
//! - `r <conversation> <seq> <user>`: the user has read up to `seq`.
//!
//! Parsing never panics: every field is checked, anything malformed is
//! skipped.

use crate::store::notice::{now_ms, MAX_PAYLOAD};
use crate::store::NoticeKey;
use tether_protocol::auth::valid_user_id;

/// The LISTEN/NOTIFY channel of signals.
pub const SIGNAL_CHANNEL: &str = "tether_signals";

/// Room for a payload's body (the authentication line takes the rest).
const MAX_BODY: usize = MAX_PAYLOAD - 150;

/// One ephemeral signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    Presence {
        user: String,
        online: bool,
        /// RFC 3339 UTC.
        last_seen: String,
    },
    Typing {
        conversation_id: i64,
        user: String,
    },
    Read {
        conversation_id: i64,
        user: String,
        seq: i64,
    },
}

impl Signal {
    fn line(&self) -> String {
        match self {
            Signal::Presence {
                user,
                online,
                last_seen,
            } => format!("p {} {last_seen} {user}", u8::from(*online)),
            Signal::Typing {
                conversation_id,
                user,
            } => format!("t {conversation_id} {user}"),
            Signal::Read {
                conversation_id,
                user,
                seq,
            } => format!("r {conversation_id} {seq} {user}"),
        }
    }

    fn parse_line(line: &str) -> Option<Signal> {
        let mut f = line.split(' ');
        let signal = match f.next()? {
            "p" => {
                let online = match f.next()? {
                    "1" => true,
                    "0" => false,
                    _ => return None,
                };
                let last_seen = f.next()?;
                if last_seen.len() > 40 || !last_seen.bytes().all(|b| b.is_ascii_graphic()) {
                    return None;
                }
                Signal::Presence {
                    online,
                    last_seen: last_seen.to_string(),
                    user: f.next()?.to_string(),
                }
            }
            "t" => Signal::Typing {
                conversation_id: positive(f.next()?)?,
                user: f.next()?.to_string(),
            },
            "r" => Signal::Read {
                conversation_id: positive(f.next()?)?,
                seq: f.next()?.parse().ok().filter(|s: &i64| *s >= 0)?,
                user: f.next()?.to_string(),
            },
            _ => return None,
        };
        if f.next().is_some() || !valid_user_id(signal.user()) {
            return None;
        }
        Some(signal)
    }

    /// The user the signal is about.
    pub fn user(&self) -> &str {
        match self {
            Signal::Presence { user, .. }
            | Signal::Typing { user, .. }
            | Signal::Read { user, .. } => user,
        }
    }
}

fn positive(s: &str) -> Option<i64> {
    s.parse().ok().filter(|v: &i64| *v > 0)
}

/// `signals` as authenticated payloads, as few as fit.
pub fn encode(signals: &[Signal], key: &NoticeKey) -> Vec<String> {
    encode_at(signals, key, now_ms())
}

pub fn encode_at(signals: &[Signal], key: &NoticeKey, now_ms: u64) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut body = String::new();
    for s in signals {
        let line = s.line();
        if !body.is_empty() && body.len() + 1 + line.len() > MAX_BODY {
            payloads.push(key.seal(&body, now_ms));
            body.clear();
        }
        if !body.is_empty() {
            body.push('\n');
        }
        body.push_str(&line);
    }
    if !body.is_empty() {
        payloads.push(key.seal(&body, now_ms));
    }
    payloads
}

/// The signals of an authenticated payload; `None` when it is not
/// authenticated (or not recent).
pub fn parse(payload: &str, key: &NoticeKey) -> Option<Vec<Signal>> {
    parse_at(payload, key, now_ms())
}

pub fn parse_at(payload: &str, key: &NoticeKey, now_ms: u64) -> Option<Vec<Signal>> {
    let body = key.open(payload, now_ms)?;
    Some(body.lines().filter_map(Signal::parse_line).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_790_000_000_000;

    fn key() -> NoticeKey {
        NoticeKey::derive(b"0123456789abcdef0123456789abcdef")
    }

    fn all() -> Vec<Signal> {
        vec![
            Signal::Presence {
                user: "alice".into(),
                online: true,
                last_seen: "2026-12-02T12:00:00.000000Z".into(),
            },
            Signal::Typing {
                conversation_id: 7,
                user: "bob@x".into(),
            },
            Signal::Read {
                conversation_id: 7,
                user: "carol".into(),
                seq: 42,
            },
        ]
    }

    #[test]
    fn round_trips_in_one_payload() {
        let payloads = encode_at(&all(), &key(), NOW);
        assert_eq!(payloads.len(), 1);
        assert_eq!(parse_at(&payloads[0], &key(), NOW), Some(all()));
    }

    #[test]
    fn many_signals_split_into_payloads_that_fit() {
        let many: Vec<Signal> = (1..2000)
            .map(|c| Signal::Typing {
                conversation_id: c,
                user: "a-rather-long-user-name-for-the-test".into(),
            })
            .collect();
        let payloads = encode_at(&many, &key(), NOW);
        assert!(payloads.len() > 1);
        let mut back = Vec::new();
        for p in &payloads {
            assert!(p.len() <= MAX_PAYLOAD, "{}", p.len());
            back.extend(parse_at(p, &key(), NOW).unwrap());
        }
        assert_eq!(back, many);
    }

    #[test]
    fn unauthenticated_or_stale_payloads_are_dropped_whole() {
        let good = encode_at(&all(), &key(), NOW).remove(0);
        let other = NoticeKey::derive(b"another secret of thirty-two bytes!");
        assert_eq!(parse_at(&good, &other, NOW), None);
        assert_eq!(parse_at(&good, &key(), NOW + 61_000), None);
        let (_, body) = good.split_once('\n').unwrap();
        assert_eq!(parse_at(body, &key(), NOW), None, "no authentication line");
        let forged = good.replace("alice", "mallory");
        assert_eq!(parse_at(&forged, &key(), NOW), None);
    }

    #[test]
    fn malformed_lines_are_skipped_never_a_panic() {
        let bad = [
            "p 2 x alice",
            "p 1 2026 bad user",
            "p 1",
            "t 0 alice",
            "t -3 alice",
            "t 99999999999999999999 alice",
            "r 1 -1 alice",
            "r 1 x alice",
            "t 1 al ice",
            "t 1 ",
            "x 1 alice",
            "",
            "t 1 \u{feff}alice",
        ];
        let body = bad.join("\n") + "\nt 5 ok";
        let payload = key().seal(&body, NOW);
        assert_eq!(
            parse_at(&payload, &key(), NOW),
            Some(vec![Signal::Typing {
                conversation_id: 5,
                user: "ok".into()
            }])
        );
        for junk in ["", "\n", "a", "a 1 2\n", "\u{0}\u{1}", "a x yy\np 1 t u"] {
            assert_eq!(parse_at(junk, &key(), NOW), None);
        }
    }
}
