//! Group commit: the write path of messages.
//!
//! Sends go to one of N commit lanes (by conversation id, so one
//! conversation's sends from this worker stay in arrival order). Each lane
//! is a dedicated thread with its own PostgreSQL connection: it takes
//! every send waiting in its queue (up to `max_batch`), appends them in ONE
//! transaction ([`store::append_messages`]), and only after COMMIT answers
//! each sender and hands the new events to the fan-out. While one batch
//! commits, the next one fills, so throughput grows with load instead of
//! being capped at one fsync per message.

use crate::fanout::Dispatcher;
use crate::frame::Frame;
use crate::metrics::Metrics;
use crate::store::{
    self, AppendStatements, Appended, DbSettings, NewMessage, NoticeKey, Pooler, StoreError,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Where a send's result goes.
pub enum ReplyTo {
    /// An HTTP request waiting for its answer.
    Once(oneshot::Sender<Result<Appended, StoreError>>),
    /// A WebSocket connection's reply queue (with the send's client_msg_id).
    /// Boxed: a channel allocates a block of 32 slots up front, and every
    /// idle connection has one, so slots must be small.
    Conn(mpsc::Sender<Box<ConnReply>>),
}

/// A result for a WebSocket send.
pub struct ConnReply {
    pub client_msg_id: String,
    pub conversation_id: i64,
    pub result: Result<Appended, StoreError>,
}

/// One message waiting to be committed.
pub struct SendRequest {
    pub message: NewMessage,
    pub reply: ReplyTo,
    pub queued_at: Instant,
}

/// The handle async code submits sends through.
#[derive(Clone)]
pub struct Committer {
    lanes: Arc<Vec<mpsc::Sender<SendRequest>>>,
    /// Sends submitted and not yet answered (queued or being committed).
    pending: Arc<Pending>,
}

/// Sends submitted and not yet answered, with a wake-up when none are
/// left (draining waits on it instead of polling).
#[derive(Default)]
pub struct Pending {
    count: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl Pending {
    fn add(&self, n: usize) {
        self.count.fetch_add(n, Ordering::AcqRel);
    }

    fn done(&self, n: usize) {
        if self.count.fetch_sub(n, Ordering::AcqRel) == n {
            self.idle.notify_waiters();
        }
    }

    fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves once no send is pending.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Sends waiting per lane before submitters wait (backpressure).
const LANE_QUEUE: usize = 8192;
/// After a failed connect, fail sends at once for this long instead of
/// making every one wait for a connect timeout.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(250);

impl Committer {
    /// Starts `lanes` commit threads.
    pub fn start(
        settings: DbSettings,
        key: NoticeKey,
        lanes: usize,
        max_batch: usize,
        dispatcher: Dispatcher,
        metrics: Arc<Metrics>,
        worker_id: &str,
    ) -> Committer {
        let mut senders = Vec::with_capacity(lanes);
        let pending = Arc::new(Pending::default());
        for lane in 0..lanes {
            let (tx, rx) = mpsc::channel(LANE_QUEUE);
            senders.push(tx);
            let settings = settings.clone();
            let key = key.clone();
            let dispatcher = dispatcher.clone();
            let metrics = metrics.clone();
            let pending = pending.clone();
            thread::Builder::new()
                .name(format!("{worker_id}-commit{lane}"))
                .spawn(move || {
                    lane_loop(
                        lane, rx, settings, key, max_batch, dispatcher, metrics, pending,
                    )
                })
                .expect("spawning a commit lane thread");
        }
        Committer {
            lanes: Arc::new(senders),
            pending,
        }
    }

    /// Queues a send. Waits only if the lane's queue is full.
    pub async fn submit(&self, req: SendRequest) -> Result<(), SendRequest> {
        let lane = (req.message.conversation_id.unsigned_abs() as usize) % self.lanes.len();
        self.pending.add(1);
        let r = self.lanes[lane].send(req).await.map_err(|e| e.0);
        if r.is_err() {
            self.pending.done(1);
        }
        r
    }

    /// Sends submitted and not yet answered.
    pub fn pending(&self) -> usize {
        self.pending.get()
    }

    /// Resolves once every submitted send is answered.
    pub async fn idle(&self) {
        self.pending.idle().await
    }

    /// Sends waiting in lane queues (not yet taken into a batch).
    pub fn queued(&self) -> usize {
        self.lanes
            .iter()
            .map(|l| l.max_capacity() - l.capacity())
            .sum()
    }
}

fn reply(
    to: ReplyTo,
    client_msg_id: String,
    conversation_id: i64,
    result: Result<Appended, StoreError>,
) {
    match to {
        ReplyTo::Once(tx) => {
            let _ = tx.send(result);
        }
        ReplyTo::Conn(tx) => {
            // The connection reserves room for every send it has in flight,
            // so this only fails if the connection is gone.
            let _ = tx.try_send(Box::new(ConnReply {
                client_msg_id,
                conversation_id,
                result,
            }));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn lane_loop(
    lane: usize,
    mut rx: mpsc::Receiver<SendRequest>,
    settings: DbSettings,
    key: NoticeKey,
    max_batch: usize,
    dispatcher: Dispatcher,
    metrics: Arc<Metrics>,
    pending: Arc<Pending>,
) {
    // The lane's connection and its prepared write statements.
    let mut client: Option<(postgres::Client, AppendStatements)> = None;
    let mut last_connect_failure: Option<(Instant, StoreError)> = None;
    while let Some(first) = rx.blocking_recv() {
        let mut batch: Vec<SendRequest> = Vec::with_capacity(max_batch);
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        // Every request of this batch is answered before the next
        // iteration (committed, failed, or retried alone).
        let _answered = PendingGuard(&pending, batch.len());
        if client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            client = None;
            if let Some((at, err)) = &last_connect_failure {
                if at.elapsed() < RECONNECT_BACKOFF {
                    fail_all(batch, err.clone(), &metrics);
                    continue;
                }
            }
            match settings.connect().and_then(|mut c| {
                let stmts = match settings.pooler {
                    Pooler::None => AppendStatements::prepare(&mut c, &key)?,
                    Pooler::Transaction => AppendStatements::one_shot(&key),
                };
                Ok((c, stmts))
            }) {
                Ok(c) => {
                    if last_connect_failure.take().is_some() {
                        log::info!("commit lane {lane}: database connection restored");
                    }
                    client = Some(c);
                }
                Err(e) => {
                    if last_connect_failure.is_none() {
                        log::warn!("commit lane {lane}: cannot connect: {e}");
                    }
                    last_connect_failure = Some((Instant::now(), e.clone()));
                    fail_all(batch, e, &metrics);
                    continue;
                }
            }
        }
        let Some((c, stmts)) = client.as_mut() else {
            continue;
        };
        let size = batch.len();
        match commit_batch(c, stmts, batch, &dispatcher, &metrics) {
            Ok(()) => {}
            Err((batch, e)) if e.is_unavailable() => {
                log::warn!("commit lane {lane}: batch of {size} failed: {e}");
                client = None;
                fail_all(batch, e, &metrics);
            }
            Err((batch, e)) if size > 1 => {
                // An internal error may have been caused by one bad
                // message: commit the rest one by one so it fails alone.
                log::error!("commit lane {lane}: batch of {size} failed: {e}; retrying one by one");
                for req in batch {
                    if let Err((one, e)) = commit_batch(c, stmts, vec![req], &dispatcher, &metrics)
                    {
                        log::error!("commit lane {lane}: a send failed alone: {e}");
                        fail_all(one, e, &metrics);
                    }
                }
            }
            Err((batch, e)) => {
                log::error!("commit lane {lane}: a send failed: {e}");
                fail_all(batch, e, &metrics);
            }
        }
    }
    log::debug!("commit lane {lane}: queue closed, exiting");
}

/// Commits `batch` in one transaction, then (and only then) hands the new
/// events to the fan-out and answers every sender. On a database error
/// nothing was committed and the batch comes back unanswered.
fn commit_batch(
    c: &mut postgres::Client,
    stmts: &AppendStatements,
    batch: Vec<SendRequest>,
    dispatcher: &Dispatcher,
    metrics: &Metrics,
) -> Result<(), (Vec<SendRequest>, StoreError)> {
    let messages: Vec<NewMessage> = batch.iter().map(|r| r.message.clone()).collect();
    let outcome = match store::append_messages_with(c, stmts, &messages) {
        Ok(o) => o,
        Err(e) => return Err((batch, e)),
    };
    let committed_at = Instant::now();
    metrics.commit_batches.fetch_add(1, Ordering::Relaxed);
    metrics.commit_batch_size.observe(messages.len() as f64);
    metrics
        .events_committed
        .fetch_add(outcome.new_events.len() as u64, Ordering::Relaxed);
    if !outcome.new_events.is_empty() {
        dispatcher.local_blocking(
            outcome
                .new_events
                .iter()
                .map(|e| Arc::new(Frame::from_event(e, committed_at)))
                .collect(),
        );
    }
    for (req, result) in batch.into_iter().zip(outcome.results) {
        metrics
            .commit_latency
            .observe_duration(req.queued_at.elapsed());
        match &result {
            Ok(a) if a.duplicate => {
                metrics.sends_duplicate.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => {
                metrics.sends_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        answer(req, result);
    }
    Ok(())
}

fn answer(req: SendRequest, result: Result<Appended, StoreError>) {
    let NewMessage {
        client_msg_id,
        conversation_id,
        ..
    } = req.message;
    reply(req.reply, client_msg_id, conversation_id, result);
}

fn fail_all(batch: Vec<SendRequest>, err: StoreError, metrics: &Metrics) {
    metrics
        .sends_failed
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    for req in batch {
        answer(req, Err(err.clone()));
    }
}

/// Counts a batch's requests as answered when the iteration ends, however
/// it ends (`continue` included).
struct PendingGuard<'a>(&'a Pending, usize);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.done(self.1);
    }
}
