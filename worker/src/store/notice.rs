//! The notification codec: what one committing transaction says on
//! [`NOTIFY_CHANNEL`](super::NOTIFY_CHANNEL), and how a worker reads it.
//!
//! Any database role that can connect can `LISTEN` and `NOTIFY` on any
//! channel, so a payload is untrusted input. Every payload tether sends is
//! authenticated: its first line is `a <unix_ms> <hex HMAC-SHA256>` over
//! `"<unix_ms>\n<rest of the payload>"`, under a [`NoticeKey`] derived from
//! the token secret (which every worker and host of a deployment shares).
//! [`Notice::parse`] checks it in constant time and checks the stamp is
//! recent (within [`MAX_AGE_MS`], which bounds replays of a captured
//! payload).
//!
//! What an unauthenticated payload may still do is what a lost one would
//! have done: `e` and `*` lines stay as hints that make a worker read the
//! log (harmless: the log is the truth, and a read past the end returns
//! nothing). Its content (`x`) and membership (`m`) lines are dropped.
//!
//! Parsing never panics, whatever the bytes: every field is checked, and
//! anything malformed is skipped.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tether_protocol::auth::valid_user_id;
use tether_protocol::frames::Event;

type HmacSha256 = Hmac<Sha256>;

/// PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
pub const MAX_PAYLOAD: usize = 7999;
/// Room for the payload's body (the authentication line takes the rest).
const MAX_BODY: usize = 7850;
/// An authenticated payload older (or newer) than this is not trusted: a
/// captured payload can be replayed, but only within this window.
pub const MAX_AGE_MS: u64 = 60_000;

/// The key that authenticates notification payloads. Derived from the
/// token secret rather than equal to it, so a payload's MAC never serves
/// as a token signature. `Debug` does not show it.
#[derive(Clone)]
pub struct NoticeKey([u8; 32]);

impl std::fmt::Debug for NoticeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoticeKey(..)")
    }
}

impl NoticeKey {
    /// HMAC-SHA256(secret, "tether notify v1").
    pub fn derive(secret: &[u8]) -> NoticeKey {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(b"tether notify v1");
        NoticeKey(mac.finalize().into_bytes().into())
    }

    fn mac(&self, stamp: &str, body: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(stamp.as_bytes());
        mac.update(b"\n");
        mac.update(body.as_bytes());
        mac
    }

    /// `body` with its authentication line in front.
    pub(crate) fn seal(&self, body: &str, now_ms: u64) -> String {
        let stamp = now_ms.to_string();
        let tag = self.mac(&stamp, body).finalize().into_bytes();
        let mut out = String::with_capacity(body.len() + 84);
        out.push_str("a ");
        out.push_str(&stamp);
        out.push(' ');
        for b in tag {
            out.push_str(&format!("{b:02x}"));
        }
        out.push('\n');
        out.push_str(body);
        out
    }

    /// The body of `payload` if its authentication line is valid and
    /// recent; `None` otherwise.
    pub(crate) fn open<'a>(&self, payload: &'a str, now_ms: u64) -> Option<&'a str> {
        let (first, body) = payload.split_once('\n')?;
        let mut parts = first.split(' ');
        let (Some("a"), Some(stamp), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let ms: u64 = stamp.parse().ok()?;
        if ms.abs_diff(now_ms) > MAX_AGE_MS {
            return None;
        }
        let tag = decode_hex(tag)?;
        self.mac(stamp, body).verify_slice(&tag).ok()?;
        Some(body)
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    // Lowercase only, as sealed: one spelling per tag.
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Milliseconds since the Unix epoch (the stamp of a payload).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One NOTIFY payload: what a committed transaction changed.
///
/// Body lines: `e <conversation> <last_seq>` (events up to that seq are
/// committed) and `m <conversation> <seq> <user>` (that user joined or
/// left at that seq, so a worker that does not follow the conversation yet
/// learns that one of its users is now in it). `*` alone means "too much
/// to list: catch up everything you follow".
///
/// When they fit, the committed events themselves ride along on one line,
/// `x <JSON array>`, so other workers deliver them without reading the
/// log. That saves a read per batch per worker; it changes nothing about
/// correctness: the content is what was committed (and is used only when
/// the payload is authenticated), and anything a worker misses it still
/// reads from the log.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Notice {
    pub events: Vec<(i64, i64)>,
    pub membership: Vec<(i64, i64, String)>,
    pub everything: bool,
    /// The committed events, when they fit in the payload.
    pub content: Vec<Event>,
    /// Whether the payload carried a valid, recent MAC. Only then are
    /// `membership` and `content` filled in by [`Notice::parse`].
    pub authenticated: bool,
}

impl Notice {
    /// Encodes into authenticated payloads that each fit a NOTIFY (one,
    /// unless a huge membership list must be split).
    pub fn encode(&self, key: &NoticeKey) -> Vec<String> {
        self.encode_at(key, now_ms())
    }

    /// [`Notice::encode`] stamped with `now_ms`.
    pub fn encode_at(&self, key: &NoticeKey, now_ms: u64) -> Vec<String> {
        let mut bodies = Vec::new();
        let mut cur = String::new();
        let mut push = |line: String, cur: &mut String| {
            if cur.len() + line.len() + 1 > MAX_BODY {
                bodies.push(std::mem::take(cur));
            }
            cur.push_str(&line);
            cur.push('\n');
        };
        if self.everything {
            push("*".to_string(), &mut cur);
        }
        for (c, s) in &self.events {
            push(format!("e {c} {s}"), &mut cur);
        }
        for (c, s, u) in &self.membership {
            push(format!("m {c} {s} {u}"), &mut cur);
        }
        if bodies.is_empty() && !self.content.is_empty() {
            if let Ok(json) = serde_json::to_string(&self.content) {
                if cur.len() + json.len() + 3 <= MAX_BODY {
                    cur.push_str("x ");
                    cur.push_str(&json);
                    cur.push('\n');
                }
            }
        }
        if !cur.is_empty() {
            bodies.push(cur);
        }
        bodies.iter().map(|b| key.seal(b, now_ms)).collect()
    }

    /// Parses a payload, authenticating it with `key` at the current time.
    pub fn parse(payload: &str, key: &NoticeKey) -> Notice {
        Notice::parse_at(payload, key, now_ms())
    }

    /// [`Notice::parse`] at `now_ms`. Never panics; malformed lines are
    /// skipped; an unauthenticated payload yields hints only.
    pub fn parse_at(payload: &str, key: &NoticeKey, now_ms: u64) -> Notice {
        let mut n = Notice::default();
        if payload.len() > MAX_PAYLOAD {
            return n; // PostgreSQL never delivers one this long
        }
        let (body, authenticated) = match key.open(payload, now_ms) {
            Some(body) => (body, true),
            None => (payload, false),
        };
        n.authenticated = authenticated;
        for line in body.lines() {
            let mut p = line.split(' ');
            match p.next() {
                Some("*") if p.next().is_none() => n.everything = true,
                Some("e") => {
                    if let (Some(c), Some(s), None) = (id(p.next()), id(p.next()), p.next()) {
                        n.events.push((c, s));
                    }
                }
                Some("m") if authenticated => {
                    if let (Some(c), Some(s), Some(u), None) =
                        (id(p.next()), id(p.next()), p.next(), p.next())
                    {
                        if valid_user_id(u) {
                            n.membership.push((c, s, u.to_string()));
                        }
                    }
                }
                Some("x") if authenticated => {
                    if let Some(Ok(events)) = line.get(2..).map(serde_json::from_str::<Vec<Event>>)
                    {
                        if events.iter().all(|e| e.conversation_id > 0 && e.seq > 0) {
                            n.content = events;
                        }
                    }
                }
                _ => {}
            }
        }
        n
    }
}

/// A positive id or seq, or nothing.
fn id(field: Option<&str>) -> Option<i64> {
    field?.parse::<i64>().ok().filter(|v| *v > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tether_protocol::frames::EVENT_MESSAGE_CREATED;

    fn key() -> NoticeKey {
        NoticeKey::derive(b"0123456789abcdef0123456789abcdef")
    }

    fn message(c: i64, seq: i64, body: &str) -> Event {
        Event {
            conversation_id: c,
            seq,
            kind: EVENT_MESSAGE_CREATED.into(),
            sender: "a".into(),
            created_at: "2026-01-01T00:00:00.000000Z".into(),
            body: Some(body.into()),
            client_msg_id: Some("k".into()),
            user: None,
            role: None,
            title: None,
            members: None,
        }
    }

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn round_trips_and_splits() {
        let k = key();
        let n = Notice {
            events: vec![(1, 5), (2, 9)],
            membership: vec![(3, 1, "bob".into())],
            everything: false,
            content: vec![message(2, 9, "hi\nthere")],
            authenticated: true,
        };
        let p = n.encode_at(&k, NOW);
        assert_eq!(p.len(), 1);
        assert_eq!(
            Notice::parse_at(&p[0], &k, NOW),
            n,
            "content with a newline survives"
        );
        // Content that does not fit is left out; the hint stays.
        let heavy = Notice {
            events: vec![(2, 9)],
            content: vec![message(2, 9, &"y".repeat(9000))],
            ..Notice::default()
        };
        let p = heavy.encode_at(&k, NOW);
        assert_eq!(p.len(), 1);
        let back = Notice::parse_at(&p[0], &k, NOW);
        assert_eq!(back.events, vec![(2, 9)]);
        assert!(back.content.is_empty());
        let big = Notice {
            membership: (0..2000).map(|i| (1, 1, format!("user{i}"))).collect(),
            ..Notice::default()
        };
        let parts = big.encode_at(&k, NOW);
        assert!(parts.len() > 1);
        assert!(parts.iter().all(|p| p.len() <= MAX_PAYLOAD));
        let back: usize = parts
            .iter()
            .map(|p| Notice::parse_at(p, &k, NOW).membership.len())
            .sum();
        assert_eq!(back, 2000);
    }

    #[test]
    fn unauthenticated_payloads_are_hints_only() {
        let forged = format!(
            "e 7 12\nm 7 12 mallory\nx {}\n",
            serde_json::to_string(&vec![message(7, 12, "FORGED")]).unwrap()
        );
        let n = Notice::parse_at(&forged, &key(), NOW);
        assert!(!n.authenticated);
        assert_eq!(
            n.events,
            vec![(7, 12)],
            "the hint stays: it only causes a read"
        );
        assert!(n.membership.is_empty());
        assert!(n.content.is_empty());
        assert!(Notice::parse_at("*\n", &key(), NOW).everything);
    }

    #[test]
    fn tampered_wrong_key_and_stale_payloads_are_not_authenticated() {
        let k = key();
        let n = Notice {
            events: vec![(7, 12)],
            content: vec![message(7, 12, "real")],
            ..Notice::default()
        };
        let good = n.encode_at(&k, NOW).remove(0);
        assert!(Notice::parse_at(&good, &k, NOW).authenticated);
        let tampered = good.replace("real", "FAKE");
        let t = Notice::parse_at(&tampered, &k, NOW);
        assert!(!t.authenticated);
        assert!(t.content.is_empty());
        let other = NoticeKey::derive(b"another secret of thirty-two bytes!");
        assert!(!Notice::parse_at(&good, &other, NOW).authenticated);
        assert!(!Notice::parse_at(&good, &k, NOW + MAX_AGE_MS + 1).authenticated);
        assert!(!Notice::parse_at(&good, &k, NOW - MAX_AGE_MS - 1).authenticated);
        assert!(Notice::parse_at(&good, &k, NOW + MAX_AGE_MS).authenticated);
    }

    #[test]
    fn garbage_is_skipped() {
        let k = key();
        for p in [
            "",
            "x",
            "e",
            "x [",
            "a",
            "a 1",
            "a 1 zz\n",
            "e 1",
            "e -1 5",
            "e 1 -5",
            "e 0 1",
            "e 99999999999999999999999 1",
            "m 1 2",
            "m 1 2 bad user",
            "*x",
            "\u{0}\u{1}",
        ] {
            let n = Notice::parse_at(p, &k, NOW);
            assert!(
                n.events.is_empty() && n.content.is_empty() && n.membership.is_empty(),
                "{p:?}"
            );
        }
        let junk = "é".repeat(4000);
        assert_eq!(Notice::parse_at(&junk, &k, NOW), Notice::default());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn parse_never_panics_on_arbitrary_strings(s in ".{0,8000}") {
            let n = Notice::parse_at(&s, &key(), NOW);
            prop_assert!(!n.authenticated);
            prop_assert!(n.content.is_empty() && n.membership.is_empty());
            prop_assert!(n.events.iter().all(|(c, s)| *c > 0 && *s > 0));
        }

        #[test]
        fn parse_never_panics_on_line_shaped_input(
            lines in proptest::collection::vec(
                ("[aemx*]{0,2}", proptest::collection::vec("[-0-9a-z\\[\\]{}\":,é]{0,24}", 0..4)),
                0..40,
            )
        ) {
            let payload: String = lines
                .iter()
                .map(|(head, fields)| format!("{head} {}\n", fields.join(" ")))
                .collect();
            let n = Notice::parse_at(&payload, &key(), NOW);
            prop_assert!(!n.authenticated);
            prop_assert!(n.content.is_empty());
        }

        #[test]
        fn any_change_to_a_sealed_payload_loses_authentication(
            at in 0usize..200, byte in 0u8..128,
        ) {
            let k = key();
            let n = Notice { events: vec![(3, 4)], content: vec![message(3, 4, "body")], ..Notice::default() };
            let good = n.encode_at(&k, NOW).remove(0);
            let mut bytes = good.clone().into_bytes();
            let i = at % bytes.len();
            prop_assume!(bytes[i] != byte);
            bytes[i] = byte;
            let Ok(changed) = String::from_utf8(bytes) else { return Ok(()) };
            let parsed = Notice::parse_at(&changed, &k, NOW);
            prop_assert!(!parsed.authenticated);
            prop_assert!(parsed.content.is_empty());
        }
    }
}
