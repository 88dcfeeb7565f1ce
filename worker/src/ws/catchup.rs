//! Getting a connection up to date, on every path where it could fall
//! behind: the backlog at connect, the dispatcher's frames (with gaps
//! repaired from the log), and `Backfill` ranges the dispatcher could not
//! serve from the cache. Every frame goes through the connection's
//! [`Sequencer`]; every wait for the database ends when the client closes
//! or the worker drains.

use super::{Connection, End, MAX_DEFERRED, PAGE};
use crate::fanout::ConnMsg;
use crate::frame::Frame;
use crate::sequencer::Verdict;
use crate::store;
use crate::wire::Out;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_protocol::frames::server;
use tokio_tungstenite::tungstenite::Message;

/// Whether the caller knows the user's membership is unbroken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// Just read with the memberships.
    Member,
    /// To be checked.
    Unsure,
}

impl Connection {
    /// Registers interest, reads memberships, subscribes, replays every
    /// event above the cursor of every conversation, says `synced`.
    /// Retries while the database is down (the socket stays open).
    pub(super) async fn replay_backlog(&mut self) -> Result<(), End> {
        let mut told_unavailable = false;
        let memberships = loop {
            let user = self.user.to_string();
            match self.app.db(move |c| store::memberships(c, &user)).await {
                Ok(m) => break m,
                Err(e) if e.is_unavailable() => {
                    if !told_unavailable {
                        told_unavailable = true;
                        let f = server::error(
                            "database_unavailable",
                            "the database is unavailable; your backlog follows when it returns",
                            None,
                            Some(1),
                        );
                        self.write_now("error", f)
                            .await
                            .map_err(|_| End::ClientClosed)?;
                    }
                    self.pause(Duration::from_millis(500), false).await?;
                }
                Err(e) => {
                    log::error!("user={} conn={}: memberships: {e}", self.user, self.id);
                    return Err(End::Internal("could not read memberships"));
                }
            }
        };
        for m in &memberships {
            self.seq.start(m.conversation_id, m.cursor);
        }
        #[cfg(feature = "fault-injection")]
        self.fault_hold_before_subscribe().await;
        self.app
            .dispatcher
            .subscribe(
                self.id,
                memberships
                    .iter()
                    .map(|m| (m.conversation_id, m.last_seq))
                    .collect(),
            )
            .await;
        let mut replayed = 0u64;
        for m in &memberships {
            let (c, upto) = (m.conversation_id, m.last_seq);
            // Below the retention horizon: `truncated`, then from there
            // (the memberships just read say the membership is unbroken
            // since the cursor: it starts at most one past it).
            let mut after = m.cursor;
            if m.horizon > after {
                self.pass_horizon(c, m.horizon, Known::Member, false)
                    .await?;
                after = m.horizon.min(upto);
            }
            // Members of one conversation missed the same events: the
            // first to reconnect reads them, the rest are served from memory.
            if let Some(frames) = self.app.recent.get(c, after, upto) {
                for f in &frames {
                    replayed += 1;
                    self.write_frame(f).await?;
                }
                self.flush().await.map_err(|_| End::ClientClosed)?;
                continue;
            }
            while after < upto {
                let page = match self
                    .app
                    .db_history(c, upto, move |cl| {
                        store::events_range(cl, c, after, upto, PAGE)
                    })
                    .await
                {
                    Ok(p) => p,
                    Err(e) if e.is_unavailable() => {
                        self.pause(Duration::from_millis(500), false).await?;
                        continue;
                    }
                    Err(e) => {
                        log::error!("user={} conn={}: backlog of {c}: {e}", self.user, self.id);
                        return Err(End::Internal("could not read the backlog"));
                    }
                };
                if page.horizon > after {
                    self.pass_horizon(c, page.horizon, Known::Unsure, false)
                        .await?;
                    after = page.horizon;
                }
                let page = page.events;
                if page.is_empty() {
                    break;
                }
                let now = Instant::now();
                let frames: Vec<Arc<Frame>> = page
                    .iter()
                    .map(|e| Arc::new(Frame::from_event(e, now)))
                    .collect();
                self.app.recent.put(c, &frames);
                for f in &frames {
                    after = f.seq;
                    replayed += 1;
                    self.write_frame(f).await?;
                }
                self.flush().await.map_err(|_| End::ClientClosed)?;
            }
        }
        self.app.metrics.backlog_events.observe(replayed as f64);
        self.write_now("synced", server::synced())
            .await
            .map_err(|_| End::ClientClosed)?;
        self.presence_burst().await?;
        log::debug!(
            "user={} conn={}: synced after {replayed} backlog events",
            self.user,
            self.id
        );
        Ok(())
    }

    /// Right after `synced`: the presence of the other members of the
    /// user's conversations small enough to push to (at most
    /// [`BURST_MAX`](crate::presence::BURST_MAX) frames). Skipped when
    /// presence is off or the database is unavailable: changes still come.
    async fn presence_burst(&mut self) -> Result<(), End> {
        if !self.app.signals.enabled() {
            return Ok(());
        }
        let (user, max) = (
            self.user.to_string(),
            self.app.config.presence.push_max_members,
        );
        let burst = self
            .app
            .db(move |c| store::presence::burst(c, &user, max, crate::presence::BURST_MAX))
            .await;
        match burst {
            Ok(rows) => {
                for (c, p) in rows {
                    let f = server::presence(c, &p.user, p.online, &p.last_seen);
                    self.write_control("presence", f)
                        .await
                        .map_err(|_| End::ClientClosed)?;
                }
                self.flush().await.map_err(|_| End::ClientClosed)
            }
            Err(e) => {
                log::debug!("user={} conn={}: presence burst: {e}", self.user, self.id);
                Ok(())
            }
        }
    }

    /// Test-only (fault injection): with `TETHER_FAULT_HOLD_SUBSCRIBE_DIR`
    /// set (and `TETHER_FAULT_HOLD_SUBSCRIBE_USER` naming this user, if
    /// set), hold this connection between its memberships read and its
    /// subscribe until the file `release` appears there (at most 30 s),
    /// after saying so with a file `held-<user>-<conn>`: the test widens
    /// the race between reading memberships and subscribing at will.
    #[cfg(feature = "fault-injection")]
    async fn fault_hold_before_subscribe(&mut self) {
        let Some(dir) = std::env::var_os("TETHER_FAULT_HOLD_SUBSCRIBE_DIR") else {
            return;
        };
        if std::env::var("TETHER_FAULT_HOLD_SUBSCRIBE_USER").is_ok_and(|u| u != *self.user) {
            return;
        }
        let dir = std::path::PathBuf::from(dir);
        let _ = std::fs::write(dir.join(format!("held-{}-{}", self.user, self.id)), b"");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dir.join("release").exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sleeps `d`, but ends early, with the reason, if the client closes
    /// or the worker drains. Frames the client sends meanwhile are refused
    /// before `synced` (the client must wait for its backlog) and kept for
    /// later after it (up to [`MAX_DEFERRED`]; beyond, they wait in the
    /// socket).
    async fn pause(&mut self, d: Duration, synced: bool) -> Result<(), End> {
        let sleep = tokio::time::sleep(d);
        tokio::pin!(sleep);
        let mut phase = self.app.phase.subscribe();
        let drain = crate::phase::until_draining(&mut phase);
        tokio::pin!(drain);
        loop {
            let can_read = !synced || self.deferred.len() < MAX_DEFERRED;
            tokio::select! {
                _ = &mut sleep => return Ok(()),
                _ = &mut drain => return Err(End::Draining),
                m = self.wire.next(), if can_read => match m {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Err(End::ClientClosed),
                    Some(Ok(m)) if synced => self.deferred.push_back(m),
                    Some(Ok(Message::Text(_))) | Some(Ok(Message::Binary(_))) => {
                        let f = server::error("not_synced", "wait for synced before sending", None, Some(1));
                        self.write_now("error", f).await.map_err(|_| End::ClientClosed)?;
                    }
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    /// Writes a frame of the backlog or a repair (contiguous, read from
    /// the log or the cache) if the sequencer allows it.
    async fn write_frame(&mut self, f: &Frame) -> Result<(), End> {
        match self.seq.offer(f) {
            Verdict::Write => self
                .write(Out::Event(f))
                .await
                .map_err(|_| End::ClientClosed),
            Verdict::Skip => Ok(()),
            Verdict::Gap { after, upto } => {
                // A contiguous read has no gap: the log changed under us,
                // which it never does. Refuse to skip anything.
                log::error!(
                    "user={} conn={} conversation={}: gap {}..{} inside a contiguous read",
                    self.user,
                    self.id,
                    f.conversation_id,
                    after + 1,
                    upto
                );
                Err(End::Internal("event log read out of order"))
            }
        }
    }

    pub(super) async fn on_conn_msg(&mut self, msg: ConnMsg) -> Result<(), End> {
        self.queue.taken(&msg);
        match msg {
            ConnMsg::Event(f) => self.on_event(f).await,
            ConnMsg::Signal(text) => self
                .write(Out::Signal(&text))
                .await
                .map_err(|_| End::ClientClosed),
            ConnMsg::Backfill {
                conversation_id,
                after,
                upto,
            } => {
                let start = self.seq.replay_start(conversation_id, after);
                if start < upto {
                    Box::pin(self.repair(conversation_id, start, upto)).await?;
                }
                Ok(())
            }
        }
    }

    /// Reads (after, upto] from the log and writes what the sequencer
    /// allows (nothing after the user's own `member.left` unless they join
    /// again within the range). Waits for
    /// an unavailable database only while the client stays and the worker
    /// serves.
    async fn repair(&mut self, c: i64, mut after: i64, upto: i64) -> Result<(), End> {
        while after < upto {
            self.app
                .metrics
                .catchup_reads
                .fetch_add(1, Ordering::Relaxed);
            let page = loop {
                match self
                    .app
                    .db_history(c, upto, move |cl| {
                        store::events_range(cl, c, after, upto, PAGE)
                    })
                    .await
                {
                    Ok(p) => break p,
                    Err(e) if e.is_unavailable() => {
                        self.pause(Duration::from_millis(250), true).await?
                    }
                    Err(e) => {
                        log::error!("user={} conn={}: repair of {c}: {e}", self.user, self.id);
                        return Err(End::Internal("could not read the event log"));
                    }
                }
            };
            if page.horizon > after {
                self.pass_horizon(c, page.horizon, Known::Unsure, true)
                    .await?;
                after = page.horizon;
            }
            let page = page.events;
            if page.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            for e in &page {
                after = e.seq;
                self.write_frame(&Frame::from_event(e, now)).await?;
            }
        }
        Ok(())
    }

    /// History of `c` up to `horizon` is gone (retention). If the
    /// connection stands below it, it moves there and tells the client
    /// `truncated` (from `horizon + 1`) — but only when the user's
    /// membership is unbroken since its position, so the pruned range
    /// cannot hold their own `member.left`; otherwise the connection
    /// ends (1013) and the client's reconnect starts from the membership
    /// table. `synced`: whether the backlog is done (see `pause`).
    async fn pass_horizon(
        &mut self,
        c: i64,
        horizon: i64,
        known: Known,
        synced: bool,
    ) -> Result<(), End> {
        let Some(last) = self.seq.last(c) else {
            return Ok(()); // not a member here: nothing of `c` is written
        };
        if last >= horizon {
            return Ok(());
        }
        if known == Known::Unsure {
            let unbroken = loop {
                let user = self.user.to_string();
                match self
                    .app
                    .db(move |cl| store::member_since(cl, c, &user, last + 1))
                    .await
                {
                    Ok(b) => break b,
                    Err(e) if e.is_unavailable() => {
                        self.pause(Duration::from_millis(250), synced).await?
                    }
                    Err(e) => {
                        log::error!(
                            "user={} conn={}: membership of {c}: {e}",
                            self.user,
                            self.id
                        );
                        return Err(End::Internal("could not read the membership"));
                    }
                }
            };
            if !unbroken {
                log::info!(
                    "user={} conn={} conversation={c}: pruned past seq {last} with the membership changed; resync",
                    self.user,
                    self.id
                );
                return Err(End::Resync);
            }
        }
        if self.seq.truncate(c, horizon) {
            self.app.metrics.truncations.fetch_add(1, Ordering::Relaxed);
            self.write_control("truncated", server::truncated(c, horizon + 1))
                .await
                .map_err(|_| End::ClientClosed)?;
        }
        Ok(())
    }

    /// A frame from the dispatcher: written in order, after repairing any
    /// gap before it, if the sequencer allows it.
    async fn on_event(&mut self, f: Arc<Frame>) -> Result<(), End> {
        loop {
            match self.seq.offer(&f) {
                Verdict::Write => {
                    return self
                        .write(Out::Event(&f))
                        .await
                        .map_err(|_| End::ClientClosed)
                }
                Verdict::Skip => return Ok(()),
                Verdict::Gap { after, upto } => {
                    log::debug!(
                        "user={} conn={} conversation={}: gap {}..{}, repairing",
                        self.user,
                        self.id,
                        f.conversation_id,
                        after + 1,
                        upto
                    );
                    Box::pin(self.repair(f.conversation_id, after, upto)).await?;
                    match self.seq.last(f.conversation_id) {
                        // The log ended before `upto`: it cannot, but never
                        // loop on it.
                        Some(last) if last < upto => {
                            return Err(End::Internal("event log shorter than announced"))
                        }
                        _ => {} // repaired, or left: offer `f` again
                    }
                }
            }
        }
    }
}
