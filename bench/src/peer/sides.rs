//! The two systems behind one face: rooms of subscribers, one publisher
//! per room, a step of load at a rate, and what it delivered. tether's
//! subscribers are `tether-client`s (members of a conversation, acking once
//! a second); its publishers are members that send on another worker than
//! their readers. Nchan's are WebSocket subscribers and HTTP POSTs.

use super::nchan::Nchan;
use super::nchan_client::{publish_loop, Sub};
use crate::load::*;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tether_client::Rest;

/// The load's shape: `rooms` of `members` subscribers each.
#[derive(Clone, Copy)]
pub struct Shape {
    pub clients: usize,
    pub members: usize,
    /// Handshakes in flight while connecting (each wave synced first).
    pub wave: usize,
    pub source_addrs: bool,
    pub body: usize,
}

impl Shape {
    pub fn rooms(&self) -> usize {
        self.clients.div_ceil(self.members.max(1))
    }
    fn room_of(&self, i: usize) -> usize {
        i / self.members.max(1)
    }
}

/// One step of load and what came of it.
#[derive(Default)]
pub struct Step {
    pub published: u64,
    pub failed: u64,
    pub delivered: u64,
    pub expected: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub gaps: u64,
    pub latencies_us: Vec<u32>,
    /// tether: `read` / `presence` frames the subscribers got in the step.
    pub read_frames: u64,
    pub presence_frames: u64,
}

impl Step {
    /// Nothing lost, nothing failed, nothing twice, no gap.
    pub fn clean(&self) -> bool {
        self.missing == 0 && self.failed == 0 && self.duplicates == 0 && self.gaps == 0
    }
}

pub struct TetherSide {
    readers: Vec<Reader>,
    senders: Vec<Reader>,
    /// Acknowledged sends per conversation, over all steps.
    expected: HashMap<i64, u64>,
    base_delivered: u64,
    base_gaps: u64,
    base_dups: u64,
    base_signals: (u64, u64),
    body: usize,
}

pub struct NchanSide {
    subs: Vec<Sub>,
    rooms: Vec<String>,
    rest: Rest,
    /// Per room: successful publishes over all steps, the next counter.
    expected: Vec<u64>,
    next: Vec<usize>,
    base_delivered: u64,
    base_dups: u64,
    body: usize,
}

pub enum Side {
    Tether(TetherSide),
    Nchan(NchanSide),
}

fn tether_client_opts(t: &Target, worker: usize, user: &str) -> tether_client::ClientOptions {
    let mut opts = t.options(worker, user);
    opts.event_capacity = 1024;
    // An ack once a second per subscriber (the issue's setup), not every
    // 64 events.
    opts.ack_every = usize::MAX / 2;
    opts.ack_interval = Duration::from_secs(1);
    opts
}

impl TetherSide {
    /// Creates the conversations (not timed), then connects the readers in
    /// waves (timed: returned) and one sender per conversation on the next
    /// worker.
    pub async fn setup(
        t: &Target,
        shape: Shape,
        tag: &str,
        senders: bool,
    ) -> Result<(TetherSide, Duration), String> {
        let rooms = shape.rooms();
        let user = |kind: &str, i: usize| t.user(&format!("{tag}{kind}"), i);
        // With senders, each room's sender creates it; without, its first
        // reader does (the creator counts toward the initial members).
        let specs = (0..rooms)
            .map(|c| {
                let lo = c * shape.members;
                let hi = ((c + 1) * shape.members).min(shape.clients);
                if senders {
                    (user("s", c), (lo..hi).map(|i| user("r", i)).collect())
                } else {
                    (user("r", lo), (lo + 1..hi).map(|i| user("r", i)).collect())
                }
            })
            .collect();
        let convs = create_conversations(t, specs).await?;
        let reader_specs = (0..shape.clients)
            .map(|i| {
                let c = shape.room_of(i);
                let mut opts = tether_client_opts(t, c, &user("r", i));
                if shape.source_addrs {
                    opts.bind = Some(source_addr(i, 20_000));
                }
                (opts, convs[c])
            })
            .collect();
        let started = Instant::now();
        let readers =
            connect_readers(reader_specs, shape.wave, true, Duration::from_secs(300)).await?;
        let synced = started.elapsed();
        let senders = if senders {
            let specs = (0..rooms)
                .map(|c| {
                    let mut opts = tether_client_opts(t, c + 1, &user("s", c));
                    opts.outbox_limit = 100_000;
                    (opts, convs[c])
                })
                .collect();
            connect_readers(specs, 1000, false, Duration::from_secs(60)).await?
        } else {
            Vec::new()
        };
        let side = TetherSide {
            readers,
            senders,
            expected: HashMap::new(),
            base_delivered: 0,
            base_gaps: 0,
            base_dups: 0,
            base_signals: (0, 0),
            body: shape.body,
        };
        Ok((side, synced))
    }

    fn signals(&self) -> (u64, u64) {
        self.readers.iter().fold((0, 0), |(r, p), x| {
            (
                r + x.state.read_frames.load(Ordering::Relaxed),
                p + x.state.presence_frames.load(Ordering::Relaxed),
            )
        })
    }
}

impl NchanSide {
    pub async fn setup(
        n: &Nchan,
        shape: Shape,
        tag: &str,
        prefix: &str,
    ) -> Result<(NchanSide, Duration), String> {
        let rooms: Vec<String> = (0..shape.rooms())
            .map(|c| format!("{}{tag}{c}", prefix.replace('-', "_")))
            .collect();
        let started = Instant::now();
        let mut subs: Vec<Sub> = Vec::with_capacity(shape.clients);
        for lo in (0..shape.clients).step_by(shape.wave.max(1)) {
            let hi = (lo + shape.wave.max(1)).min(shape.clients);
            for i in lo..hi {
                let room = shape.room_of(i);
                let bind = shape.source_addrs.then_some(i);
                subs.push(Sub::start(n.port, n.ws_url(&rooms[room]), room, bind));
            }
            let fresh = &subs[lo..hi];
            let ok = wait_for(Duration::from_secs(120), || {
                fresh.iter().all(|s| {
                    s.state.open.load(Ordering::Relaxed) || s.state.failed.load(Ordering::Relaxed)
                })
            })
            .await;
            let failed = fresh
                .iter()
                .filter(|s| !s.state.open.load(Ordering::Relaxed))
                .count();
            if !ok || failed > 0 {
                return Err(format!(
                    "{failed} of {} Nchan subscribers did not connect",
                    fresh.len()
                ));
            }
        }
        let synced = started.elapsed();
        let side = NchanSide {
            expected: vec![0; rooms.len()],
            next: vec![0; rooms.len()],
            rooms,
            subs,
            rest: Rest::new(&n.base_url(), ""),
            base_delivered: 0,
            base_dups: 0,
            body: shape.body,
        };
        Ok((side, synced))
    }
}

impl Side {
    pub fn name(&self) -> &'static str {
        match self {
            Side::Tether(_) => "tether",
            Side::Nchan(_) => "Nchan",
        }
    }

    /// Publishes at `rate` msg/s in total for `duration`, then waits up to
    /// `drain` for every subscriber to have everything published so far.
    pub async fn step(&mut self, rate: f64, duration: Duration, drain: Duration) -> Step {
        match self {
            Side::Tether(s) => s.step(rate, duration, drain).await,
            Side::Nchan(s) => s.step(rate, duration, drain).await,
        }
    }

    pub fn close(&self) {
        match self {
            Side::Tether(s) => {
                for r in s.readers.iter().chain(s.senders.iter()) {
                    r.handle.close();
                }
            }
            Side::Nchan(s) => {
                for r in &s.subs {
                    r.close();
                }
            }
        }
    }
}

impl TetherSide {
    fn tally(&self) -> (u64, u64, u64, u64) {
        let (mut got, mut missing, mut gaps, mut dups) = (0, 0, 0, 0);
        for r in &self.readers {
            let m = r.state.messages.load(Ordering::Relaxed);
            got += m;
            missing += self
                .expected
                .get(&r.conversation)
                .copied()
                .unwrap_or(0)
                .saturating_sub(m);
            gaps += r.state.gaps.load(Ordering::Relaxed);
            dups += r.state.dup_surfaced.load(Ordering::Relaxed);
        }
        (got, missing, gaps, dups)
    }

    async fn step(&mut self, rate: f64, duration: Duration, drain: Duration) -> Step {
        let per = rate / self.senders.len().max(1) as f64;
        let tasks: Vec<_> = self
            .senders
            .iter()
            .map(|s| {
                tokio::spawn(send_loop(
                    s.handle.clone(),
                    s.conversation,
                    per,
                    128,
                    duration,
                    self.body,
                ))
            })
            .collect();
        let mut totals = SendTotals::default();
        for t in tasks {
            if let Ok(t) = t.await {
                totals.merge(t);
            }
        }
        for (c, seqs) in &totals.seqs {
            *self.expected.entry(*c).or_default() += seqs.len() as u64;
        }
        let expected_total: u64 = self
            .readers
            .iter()
            .map(|r| self.expected.get(&r.conversation).copied().unwrap_or(0))
            .sum();
        wait_for(drain, || self.tally().1 == 0).await;
        let (got, missing, gaps, dups) = self.tally();
        let signals = self.signals();
        let step = Step {
            read_frames: signals.0 - self.base_signals.0,
            presence_frames: signals.1 - self.base_signals.1,
            published: totals.acked,
            failed: totals.failed + totals.outbox_full,
            delivered: got - self.base_delivered,
            expected: expected_total.saturating_sub(self.base_delivered),
            missing,
            duplicates: dups - self.base_dups,
            gaps: gaps - self.base_gaps,
            latencies_us: self
                .readers
                .iter()
                .flat_map(|r| r.flush_latencies())
                .collect(),
        };
        self.base_delivered = got;
        self.base_gaps = gaps;
        self.base_signals = signals;
        self.base_dups = dups;
        step
    }
}

impl NchanSide {
    fn tally(&self) -> (u64, u64, u64) {
        let (mut got, mut missing, mut dups) = (0, 0, 0);
        for s in &self.subs {
            let m = s.state.messages.load(Ordering::Relaxed);
            got += m;
            missing += self.expected[s.room].saturating_sub(m);
            dups += s.state.duplicates.load(Ordering::Relaxed);
        }
        (got, missing, dups)
    }

    async fn step(&mut self, rate: f64, duration: Duration, drain: Duration) -> Step {
        let per = rate / self.rooms.len().max(1) as f64;
        let tasks: Vec<_> = self
            .rooms
            .iter()
            .enumerate()
            .map(|(i, room)| {
                // The same golden-ratio spread as the tether senders.
                let phase = (i as f64 * 0.618_033_988_749_895).fract();
                tokio::spawn(publish_loop(
                    self.rest.clone(),
                    room.clone(),
                    phase,
                    self.next[i],
                    per,
                    duration,
                    self.body,
                ))
            })
            .collect();
        let (mut published, mut failed) = (0, 0);
        for (i, t) in tasks.into_iter().enumerate() {
            if let Ok(t) = t.await {
                published += t.ok;
                failed += t.failed;
                self.expected[i] += t.ok;
                self.next[i] = t.next;
            }
        }
        let expected_total: u64 = self.subs.iter().map(|s| self.expected[s.room]).sum();
        wait_for(drain, || self.tally().1 == 0).await;
        let (got, missing, dups) = self.tally();
        let step = Step {
            published,
            failed,
            delivered: got - self.base_delivered,
            expected: expected_total.saturating_sub(self.base_delivered),
            missing,
            duplicates: dups - self.base_dups,
            gaps: 0,
            read_frames: 0,
            presence_frames: 0,
            latencies_us: self.subs.iter().flat_map(|s| s.flush_latencies()).collect(),
        };
        self.base_delivered = got;
        self.base_dups = dups;
        step
    }
}
