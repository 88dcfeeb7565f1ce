//! Counters and histograms, rendered in the Prometheus text format at
//! `/metrics`. Plain atomics: no lock on any hot path.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A histogram with fixed bucket bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// Latency buckets from 100 µs to 10 s.
const LATENCY_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Size buckets (events).
const SIZE_BOUNDS: &[f64] = &[0.0, 1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add((v * 1e6) as u64, Relaxed);
    }

    fn render(&self, out: &mut String, worker: &str, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.buckets) {
            cumulative += c.load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{worker=\"{worker}\",le=\"{b}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{worker=\"{worker}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "{name}_sum{{worker=\"{worker}\"}} {}\n{name}_count{{worker=\"{worker}\"}} {count}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
    }
}

/// Every metric a worker keeps.
pub struct Metrics {
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    /// Of those, SSE streams (`GET /v1/sse`).
    pub sse_streams: AtomicU64,
    pub connections_refused: AtomicU64,
    pub events_committed: AtomicU64,
    pub sends_failed: AtomicU64,
    pub sends_duplicate: AtomicU64,
    pub commit_batches: AtomicU64,
    pub deliveries: AtomicU64,
    pub catchup_reads: AtomicU64,
    pub listener_reconnects: AtomicU64,
    pub notifications_unauthenticated: AtomicU64,
    pub history_reads_replica: AtomicU64,
    pub history_reads_primary: AtomicU64,
    pub slow_client_closes: AtomicU64,
    pub rate_limited: AtomicU64,
    pub auth_failures: AtomicU64,
    pub bad_frames: AtomicU64,
    pub idle_closes: AtomicU64,
    /// Events deleted by the retention job (this worker's steps).
    pub pruned_events: AtomicU64,
    /// `truncated` frames written: a connection's position was below a
    /// conversation's horizon.
    pub truncations: AtomicU64,
    /// Presence transitions this worker made (online or offline).
    pub presence_changes: AtomicU64,
    /// Users this worker holds presence leases for (a gauge).
    pub presence_leases: AtomicU64,
    pub typing_forwarded: AtomicU64,
    /// Typing frames dropped by the once-per-2-s limit.
    pub typing_dropped: AtomicU64,
    /// Ephemeral frames (presence, typing, read) queued for connections.
    pub signal_frames: AtomicU64,
    /// Signals not published (the queue was full).
    pub signals_dropped: AtomicU64,
    /// Connections from a trusted balancer closed for a bad PROXY header.
    pub proxy_header_errors: AtomicU64,
    pub commit_latency: Histogram,
    pub commit_batch_size: Histogram,
    pub delivery_latency: Histogram,
    pub backlog_events: Histogram,
    pub pool_wait: Histogram,
    /// How late a 100 ms tick of the runtime fires: a busy or blocked
    /// event loop shows here first.
    pub event_loop_lag: Histogram,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            connections_open: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            sse_streams: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            events_committed: AtomicU64::new(0),
            sends_failed: AtomicU64::new(0),
            sends_duplicate: AtomicU64::new(0),
            commit_batches: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            catchup_reads: AtomicU64::new(0),
            listener_reconnects: AtomicU64::new(0),
            notifications_unauthenticated: AtomicU64::new(0),
            history_reads_replica: AtomicU64::new(0),
            history_reads_primary: AtomicU64::new(0),
            slow_client_closes: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            bad_frames: AtomicU64::new(0),
            idle_closes: AtomicU64::new(0),
            pruned_events: AtomicU64::new(0),
            truncations: AtomicU64::new(0),
            presence_changes: AtomicU64::new(0),
            presence_leases: AtomicU64::new(0),
            typing_forwarded: AtomicU64::new(0),
            typing_dropped: AtomicU64::new(0),
            signal_frames: AtomicU64::new(0),
            signals_dropped: AtomicU64::new(0),
            proxy_header_errors: AtomicU64::new(0),
            commit_latency: Histogram::new(LATENCY_BOUNDS),
            commit_batch_size: Histogram::new(SIZE_BOUNDS),
            delivery_latency: Histogram::new(LATENCY_BOUNDS),
            backlog_events: Histogram::new(SIZE_BOUNDS),
            pool_wait: Histogram::new(LATENCY_BOUNDS),
            event_loop_lag: Histogram::new(LATENCY_BOUNDS),
        }
    }

    /// The Prometheus text exposition. `extra` carries gauges owned by
    /// others (pool state, cluster status) as (name, help, value).
    pub fn render(&self, worker: &str, extra: &[(&str, &str, f64)]) -> String {
        let mut out = String::with_capacity(4096);
        let counters: [(&str, &str, &AtomicU64, &str); 28] = [
            (
                "tether_connections_open",
                "Open connections (WebSocket and SSE).",
                &self.connections_open,
                "gauge",
            ),
            (
                "tether_connections_total",
                "Connections accepted (WebSocket and SSE).",
                &self.connections_total,
                "counter",
            ),
            (
                "tether_sse_streams_total",
                "SSE streams accepted (GET /v1/sse; also counted in tether_connections_total).",
                &self.sse_streams,
                "counter",
            ),
            (
                "tether_connections_refused_total",
                "WebSocket upgrades and SSE streams refused (limits, draining).",
                &self.connections_refused,
                "counter",
            ),
            (
                "tether_proxy_header_errors_total",
                "Connections from a trusted balancer closed for a malformed PROXY header.",
                &self.proxy_header_errors,
                "counter",
            ),
            (
                "tether_events_committed_total",
                "Message events committed by this worker.",
                &self.events_committed,
                "counter",
            ),
            (
                "tether_sends_failed_total",
                "Sends that failed (database, membership, validation).",
                &self.sends_failed,
                "counter",
            ),
            (
                "tether_sends_duplicate_total",
                "Sends answered from an earlier commit (same client_msg_id).",
                &self.sends_duplicate,
                "counter",
            ),
            (
                "tether_commit_batches_total",
                "Group-commit transactions committed.",
                &self.commit_batches,
                "counter",
            ),
            (
                "tether_deliveries_total",
                "Events queued to WebSocket connections.",
                &self.deliveries,
                "counter",
            ),
            (
                "tether_catchup_reads_total",
                "Reads of the event log to fill a gap or a missed notification.",
                &self.catchup_reads,
                "counter",
            ),
            (
                "tether_listener_reconnects_total",
                "Times the LISTEN connection was re-established.",
                &self.listener_reconnects,
                "counter",
            ),
            (
                "tether_notifications_unauthenticated_total",
                "Notifications without a valid MAC (used only as hints to read the log).",
                &self.notifications_unauthenticated,
                "counter",
            ),
            (
                "tether_history_reads_replica_total",
                "History reads (pages, backlogs) served by the read replica.",
                &self.history_reads_replica,
                "counter",
            ),
            (
                "tether_history_reads_primary_total",
                "History reads sent to the primary because the replica was behind or failing.",
                &self.history_reads_primary,
                "counter",
            ),
            (
                "tether_pruned_events_total",
                "Events deleted by retention (--retention-max-events, --retention-days).",
                &self.pruned_events,
                "counter",
            ),
            (
                "tether_truncations_total",
                "truncated frames written: a position below a conversation's pruned horizon.",
                &self.truncations,
                "counter",
            ),
            (
                "tether_presence_changes_total",
                "Presence transitions (online, offline) this worker made.",
                &self.presence_changes,
                "counter",
            ),
            (
                "tether_presence_leases",
                "Users this worker holds presence leases for.",
                &self.presence_leases,
                "gauge",
            ),
            (
                "tether_typing_forwarded_total",
                "Typing frames forwarded.",
                &self.typing_forwarded,
                "counter",
            ),
            (
                "tether_typing_dropped_total",
                "Typing frames dropped by the once-per-2-s limit.",
                &self.typing_dropped,
                "counter",
            ),
            (
                "tether_signal_frames_total",
                "Presence, typing and read frames queued for connections.",
                &self.signal_frames,
                "counter",
            ),
            (
                "tether_signals_dropped_total",
                "Signals not published: the publishing queue was full.",
                &self.signals_dropped,
                "counter",
            ),
            (
                "tether_slow_client_closes_total",
                "Connections closed with 1013 for not reading.",
                &self.slow_client_closes,
                "counter",
            ),
            (
                "tether_rate_limited_total",
                "Sends refused by the per-user rate limit.",
                &self.rate_limited,
                "counter",
            ),
            (
                "tether_auth_failures_total",
                "Requests refused for a missing or bad token.",
                &self.auth_failures,
                "counter",
            ),
            (
                "tether_bad_frames_total",
                "Client frames refused as malformed or invalid.",
                &self.bad_frames,
                "counter",
            ),
            (
                "tether_idle_closes_total",
                "Connections closed for silence.",
                &self.idle_closes,
                "counter",
            ),
        ];
        for (name, help, v, kind) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{worker=\"{worker}\"}} {}",
                v.load(Relaxed)
            );
        }
        for (name, help, v) in extra {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{worker=\"{worker}\"}} {v}"
            );
        }
        self.commit_latency.render(
            &mut out,
            worker,
            "tether_commit_seconds",
            "Time from a send's arrival at a commit lane to its COMMIT.",
        );
        self.commit_batch_size.render(
            &mut out,
            worker,
            "tether_commit_batch_size",
            "Messages per group-commit transaction.",
        );
        self.delivery_latency.render(
            &mut out,
            worker,
            "tether_commit_to_delivery_seconds",
            "Time from COMMIT to the event being queued to a local connection.",
        );
        self.backlog_events.render(
            &mut out,
            worker,
            "tether_backlog_replay_events",
            "Events replayed to a connection before synced.",
        );
        self.pool_wait.render(
            &mut out,
            worker,
            "tether_db_pool_wait_seconds",
            "Time waiting for a read-pool connection.",
        );
        self.event_loop_lag.render(
            &mut out,
            worker,
            "tether_event_loop_lag_seconds",
            "How late a 100 ms timer of the worker's runtime fires.",
        );
        out.push_str(&tether_protocol::exposition::process_metrics(worker));
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
