//! The dispatcher's rules without processes, one rule per test. The
//! property test over random interleavings is in `simulation.rs`.

use super::*;
use crate::frame::MembershipChange as M;

fn frame(c: i64, seq: i64, m: M) -> Arc<Frame> {
    Arc::new(Frame::test(c, seq, m))
}

fn register(st: &mut State, conn: ConnId, user: &str) {
    st.handle(Input::Register {
        conn,
        user: Arc::from(user),
    });
}

/// (conn, seq) of every Send, in order.
fn sends(actions: &[Action]) -> Vec<(ConnId, i64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { conn, frame } => Some((*conn, frame.seq)),
            _ => None,
        })
        .collect()
}

fn replays(actions: &[Action]) -> Vec<(ConnId, i64, i64, i64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Replay {
                conn,
                conversation_id,
                after,
                upto,
            } => Some((*conn, *conversation_id, *after, *upto)),
            _ => None,
        })
        .collect()
}

fn fetches(actions: &[Action]) -> Vec<Vec<(i64, i64)>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Fetch(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

/// A dispatcher following conversation 1 at `upto` with `conn` of `user`
/// subscribed (the catch-up read answered with nothing).
fn following(upto: i64, conn: ConnId, user: &str) -> State {
    let mut st = State::new(100);
    register(&mut st, conn, user);
    st.handle(Input::Subscribe {
        conn,
        positions: vec![(1, upto)],
    });
    let a = st.take_actions();
    assert_eq!(fetches(&a), vec![vec![(1, upto)]]);
    st.handle(Input::Fetched {
        positions: vec![(1, upto)],
        events: Some(vec![]),
    });
    assert!(st.take_actions().is_empty());
    st
}

#[test]
fn delivers_in_order_to_subscribers() {
    let mut st = following(3, 7, "bob");
    st.handle(Input::Event(frame(1, 4, M::None)));
    st.handle(Input::Event(frame(1, 5, M::None)));
    assert_eq!(sends(&st.take_actions()), vec![(7, 4), (7, 5)]);
}

#[test]
fn an_event_ahead_of_a_gap_waits_for_the_read() {
    let mut st = following(3, 7, "bob");
    st.handle(Input::Event(frame(1, 6, M::None)));
    let a = st.take_actions();
    assert!(sends(&a).is_empty());
    assert_eq!(fetches(&a), vec![vec![(1, 3)]]);
    st.handle(Input::Fetched {
        positions: vec![(1, 3)],
        events: Some(vec![frame(1, 4, M::None), frame(1, 5, M::None)]),
    });
    assert_eq!(sends(&st.take_actions()), vec![(7, 4), (7, 5), (7, 6)]);
}

#[test]
fn a_read_that_starts_above_its_position_met_pruned_history() {
    // Retention deleted 4..=9: the read answers from 10 on. The
    // dispatcher moves past the hole instead of waiting for it forever;
    // the connection repairs 4..=9 itself and finds them pruned.
    let mut st = following(3, 7, "bob");
    st.handle(Input::Event(frame(1, 11, M::None)));
    let a = st.take_actions();
    assert_eq!(fetches(&a), vec![vec![(1, 3)]]);
    st.handle(Input::Fetched {
        positions: vec![(1, 3)],
        events: Some(vec![frame(1, 10, M::None)]),
    });
    let a = st.take_actions();
    assert_eq!(sends(&a), vec![(7, 10), (7, 11)]);
    assert!(fetches(&a).is_empty(), "no read loop on the hole");
}

#[test]
fn duplicates_are_dropped() {
    let mut st = following(3, 7, "bob");
    st.handle(Input::Event(frame(1, 4, M::None)));
    st.handle(Input::Event(frame(1, 4, M::None)));
    st.handle(Input::Event(frame(1, 2, M::None)));
    assert_eq!(sends(&st.take_actions()), vec![(7, 4)]);
}

#[test]
fn a_hint_past_upto_causes_a_read_and_one_at_or_below_does_not() {
    let mut st = following(3, 7, "bob");
    st.handle(Input::Hint {
        conversation_id: 1,
        upto: 3,
    });
    assert!(st.take_actions().is_empty());
    st.handle(Input::Hint {
        conversation_id: 1,
        upto: 9,
    });
    assert_eq!(fetches(&st.take_actions()), vec![vec![(1, 3)]]);
    // A hint for a conversation nobody here follows is ignored.
    st.handle(Input::Hint {
        conversation_id: 2,
        upto: 9,
    });
    assert!(st.take_actions().is_empty());
}

#[test]
fn a_failed_read_is_retried_later() {
    let mut st = following(3, 7, "bob");
    st.handle(Input::Hint {
        conversation_id: 1,
        upto: 9,
    });
    let p = fetches(&st.take_actions()).remove(0);
    st.handle(Input::Fetched {
        positions: p,
        events: None,
    });
    let a = st.take_actions();
    assert!(matches!(a.as_slice(), [Action::RetryLater]));
    st.handle(Input::RetryFetches);
    assert_eq!(fetches(&st.take_actions()), vec![vec![(1, 3)]]);
}

#[test]
fn a_full_read_is_followed_by_another() {
    let mut st = State::new(2);
    register(&mut st, 7, "bob");
    st.handle(Input::Subscribe {
        conn: 7,
        positions: vec![(1, 0)],
    });
    let p = fetches(&st.take_actions()).remove(0);
    st.handle(Input::Fetched {
        positions: p,
        events: Some(vec![frame(1, 1, M::None), frame(1, 2, M::None)]),
    });
    let a = st.take_actions();
    assert_eq!(sends(&a), vec![(7, 1), (7, 2)]);
    assert_eq!(fetches(&a), vec![vec![(1, 2)]]);
}

#[test]
fn a_late_subscriber_is_replayed_what_it_missed() {
    let mut st = following(5, 7, "alice");
    register(&mut st, 8, "bob");
    st.handle(Input::Subscribe {
        conn: 8,
        positions: vec![(1, 2)],
    });
    assert_eq!(replays(&st.take_actions()), vec![(8, 1, 2, 5)]);
    st.handle(Input::Event(frame(1, 6, M::None)));
    assert_eq!(sends(&st.take_actions()), vec![(7, 6), (8, 6)]);
}

#[test]
fn the_removed_member_gets_their_member_left_and_nothing_after() {
    let mut st = following(3, 7, "bob");
    st.handle(Input::Event(frame(1, 4, M::Left("bob".into()))));
    st.handle(Input::Event(frame(1, 5, M::None)));
    assert_eq!(sends(&st.take_actions()), vec![(7, 4)]);
}

#[test]
fn a_subscription_whose_range_holds_the_member_left_is_refused() {
    // bob's first connection keeps the conversation followed; his second
    // read its memberships at seq 3, then bob was removed at 4.
    let mut st = following(3, 7, "alice");
    register(&mut st, 8, "bob");
    st.handle(Input::Event(frame(1, 4, M::Left("bob".into()))));
    st.handle(Input::Event(frame(1, 5, M::None)));
    st.take_actions();
    st.handle(Input::Subscribe {
        conn: 8,
        positions: vec![(1, 3)],
    });
    let a = st.take_actions();
    assert_eq!(
        replays(&a),
        vec![(8, 1, 3, 4)],
        "up to the member.left only"
    );
    st.handle(Input::Event(frame(1, 6, M::None)));
    assert_eq!(
        sends(&st.take_actions()),
        vec![(7, 6)],
        "bob is not subscribed"
    );
}

#[test]
fn rejoining_subscribes_again_from_the_member_joined() {
    let mut st = following(3, 7, "bob");
    st.handle(Input::Event(frame(1, 4, M::Left("bob".into()))));
    // Someone else keeps it followed.
    register(&mut st, 9, "carol");
    st.handle(Input::Subscribe {
        conn: 9,
        positions: vec![(1, 4)],
    });
    let p = fetches(&st.take_actions()).remove(0);
    st.handle(Input::Fetched {
        positions: p,
        events: Some(vec![]),
    });
    st.handle(Input::Event(frame(1, 5, M::None)));
    st.handle(Input::Event(frame(1, 6, M::Joined("bob".into()))));
    st.handle(Input::Event(frame(1, 7, M::None)));
    let s = sends(&st.take_actions());
    assert!(!s.contains(&(7, 5)));
    assert!(s.contains(&(7, 6)) && s.contains(&(7, 7)));
}

#[test]
fn a_join_of_a_local_user_follows_an_unfollowed_conversation() {
    let mut st = State::new(100);
    register(&mut st, 7, "bob");
    st.handle(Input::Event(frame(4, 10, M::Joined("bob".into()))));
    let a = st.take_actions();
    assert_eq!(sends(&a), vec![(7, 10)]);
    // Someone else's join does not.
    st.handle(Input::Event(frame(5, 3, M::Joined("zed".into()))));
    assert!(sends(&st.take_actions()).is_empty());
    assert_eq!(st.followed(), 1);
}

#[test]
fn a_member_hint_follows_only_for_local_users() {
    let mut st = State::new(100);
    register(&mut st, 7, "bob");
    st.handle(Input::MemberHint {
        conversation_id: 4,
        seq: 10,
        user: "zed".into(),
    });
    assert!(st.take_actions().is_empty());
    st.handle(Input::MemberHint {
        conversation_id: 4,
        seq: 10,
        user: "bob".into(),
    });
    assert_eq!(fetches(&st.take_actions()), vec![vec![(4, 9)]]);
}

#[test]
fn gone_connections_stop_receiving_and_unfollow() {
    let mut st = following(3, 7, "bob");
    st.handle(Input::Gone { conn: 7 });
    st.handle(Input::Event(frame(1, 4, M::None)));
    assert!(sends(&st.take_actions()).is_empty());
    assert_eq!(st.followed(), 0);
}

#[test]
fn catch_up_all_reads_every_followed_conversation() {
    let mut st = following(3, 7, "bob");
    st.handle(Input::CatchUpAll);
    assert_eq!(fetches(&st.take_actions()), vec![vec![(1, 3)]]);
}

#[test]
fn a_signal_reaches_the_other_members_here_and_nobody_else() {
    let mut st = following(3, 7, "bob");
    register(&mut st, 8, "alice");
    st.handle(Input::Subscribe {
        conn: 8,
        positions: vec![(1, 3)],
    });
    register(&mut st, 9, "carol"); // not subscribed to conversation 1
    let _ = st.take_actions();
    let signal = |about: &str| Input::Signal {
        conversation_id: 1,
        about: Arc::from(about),
        text: Utf8Bytes::from_static("{}"),
    };
    let targets = |actions: Vec<Action>| -> Vec<ConnId> {
        actions
            .into_iter()
            .filter_map(|a| match a {
                Action::Signal { conn, .. } => Some(conn),
                _ => None,
            })
            .collect()
    };
    st.handle(signal("alice"));
    assert_eq!(targets(st.take_actions()), vec![7], "not to alice herself");
    st.handle(signal("dave"));
    let mut t = targets(st.take_actions());
    t.sort();
    assert_eq!(t, vec![7, 8]);
    st.handle(Input::Signal {
        conversation_id: 2,
        about: Arc::from("dave"),
        text: Utf8Bytes::from_static("{}"),
    });
    assert!(
        targets(st.take_actions()).is_empty(),
        "nobody follows 2 here"
    );
}
