//! The supervisor's rules without processes: each decision (spawn,
//! restart with backoff, the intensity limit, hang and ready timeouts,
//! drain, the SIGHUP roll, a lost control socket) driven by inputs with
//! explicit times, asserted on the actions and the state.

use super::*;

const MS: Duration = Duration::from_millis(1);

fn settings(workers: u32) -> Settings {
    Settings {
        workers,
        ready_timeout: 1000 * MS,
        heartbeat_timeout: 3000 * MS,
        kill_after: 2000 * MS,
        drain_delay: Duration::ZERO,
        backoff: Backoff::new(100 * MS, 1600 * MS, Duration::from_secs(10)),
        intensity: Intensity::new(3, Duration::from_secs(60)),
        watchdog: None,
        listen_desc: "127.0.0.1:0".into(),
    }
}

/// The rules and a clock; spawns succeed with pid 1000 + n unless told.
struct World {
    rules: Cluster,
    t0: Instant,
    now: Instant,
    fail_spawns: bool,
    /// Every action performed, in order.
    log: Vec<Action>,
}

impl World {
    fn new(workers: u32) -> World {
        let t0 = Instant::now();
        World {
            rules: Cluster::new(settings(workers), t0),
            t0,
            now: t0,
            fail_spawns: false,
            log: Vec::new(),
        }
    }

    fn at(&mut self, ms: u64) -> &mut World {
        self.now = self.t0 + Duration::from_millis(ms);
        self
    }

    fn feed(&mut self, input: Input) -> Vec<Action> {
        self.rules.handle(input, self.now);
        let mut out = Vec::new();
        while let Some(a) = self.rules.next_action() {
            if let Action::Spawn { n } = a {
                let answer = if self.fail_spawns {
                    Input::SpawnFailed {
                        n,
                        error: format!("cannot exec w{n}"),
                    }
                } else {
                    Input::Spawned {
                        n,
                        pid: 1000 + n as i32,
                    }
                };
                self.rules.handle(answer, self.now);
            }
            out.push(a.clone());
            self.log.push(a);
        }
        out
    }

    fn tick(&mut self) -> Vec<Action> {
        self.feed(Input::Tick)
    }

    fn ready(&mut self, n: u64) -> Vec<Action> {
        self.feed(Input::Control {
            n,
            message: WorkerMessage::Ready,
        });
        self.tick()
    }

    fn exit(&mut self, n: u64) -> Vec<Action> {
        self.feed(Input::Exited {
            n,
            how: "exit code 1".into(),
        });
        self.tick()
    }
}

fn spawns(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn { n } => Some(*n),
            _ => None,
        })
        .collect()
}

fn signals(actions: &[Action]) -> Vec<(u64, Kill)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Signal { n, signal, .. } => Some((*n, *signal)),
            _ => None,
        })
        .collect()
}

fn notified(actions: &[Action], key: &str) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::Notify(f) if f.iter().any(|(k, _)| *k == key)))
}

/// Two workers, both ready.
fn running() -> World {
    let mut w = World::new(2);
    assert_eq!(spawns(&w.tick()), vec![1, 2]);
    w.ready(1);
    let a = w.ready(2);
    assert!(notified(&a, "READY"));
    w
}

#[test]
fn starts_the_configured_workers_and_is_ready_when_all_are() {
    let mut w = World::new(3);
    assert_eq!(spawns(&w.tick()), vec![1, 2, 3]);
    assert!(!notified(&w.ready(1), "READY"));
    assert!(!notified(&w.ready(2), "READY"));
    assert!(notified(&w.ready(3), "READY"));
    assert_eq!(w.rules.status().alive, 3);
    assert_eq!(w.rules.status().restarts, 0);
    // Ready workers get the cluster's status line.
    assert!(w
        .log
        .iter()
        .any(|a| matches!(a, Action::SendStatus { n: 3, status } if status.alive == 3)));
}

#[test]
fn a_dead_worker_is_replaced_at_once_then_after_the_backoff_and_counted() {
    let mut w = running();
    w.at(5000);
    assert_eq!(
        spawns(&w.exit(1)),
        vec![3],
        "the first replacement is immediate"
    );
    assert_eq!(w.rules.status().restarts, 1);
    w.at(5010);
    assert!(spawns(&w.exit(3)).is_empty(), "not before its delay");
    assert_eq!(w.rules.next_deadline(), Some(w.now + 100 * MS));
    w.at(5110);
    assert_eq!(spawns(&w.tick()), vec![4]);
    assert_eq!(w.rules.status().restarts, 2);
    assert_eq!(w.rules.workers(), vec![2, 4]);
}

#[test]
fn quick_deaths_back_off_exponentially_then_the_limit_gives_up() {
    let mut w = running();
    // Worker 1 dies at once, its replacements too.
    w.at(10);
    assert_eq!(spawns(&w.exit(1)), vec![3]);
    w.at(20);
    assert!(spawns(&w.exit(3)).is_empty());
    assert_eq!(w.rules.next_deadline(), Some(w.now + 100 * MS));
    w.at(120);
    assert_eq!(spawns(&w.tick()), vec![4]);
    w.at(130);
    w.exit(4);
    // The third quick death waits twice as long as the second.
    assert_eq!(w.rules.next_deadline(), Some(w.now + 200 * MS));
    assert!(w.rules.outcome().is_none());
    w.at(140);
    let a = w.exit(2);
    // The fourth death in the window: stop, SIGTERM to what is left.
    assert!(notified(&w.log, "STOPPING"));
    assert!(spawns(&a).is_empty());
    let left = w.rules.workers();
    for n in left {
        w.exit(n);
    }
    assert_eq!(w.rules.outcome(), Some(Outcome::GaveUp));
    assert_eq!(Outcome::GaveUp.exit_code(), 1);
}

#[test]
fn failed_spawns_count_as_deaths() {
    let mut w = World::new(1);
    w.fail_spawns = true;
    w.tick();
    assert!(w.rules.workers().is_empty());
    w.at(100);
    w.tick();
    w.at(400);
    w.tick();
    w.at(1000);
    w.tick();
    assert_eq!(w.rules.outcome(), Some(Outcome::GaveUp));
}

#[test]
fn a_worker_that_never_says_ready_is_killed_and_replaced() {
    let mut w = World::new(1);
    w.tick();
    w.at(999);
    assert!(signals(&w.tick()).is_empty());
    w.at(1000);
    assert_eq!(signals(&w.tick()), vec![(1, Kill::Kill)]);
    w.at(1010);
    assert_eq!(spawns(&w.exit(1)), vec![2]);
}

#[test]
fn a_hung_worker_is_killed() {
    let mut w = running();
    w.at(2000);
    w.feed(Input::Control {
        n: 2,
        message: WorkerMessage::Heartbeat,
    });
    w.at(3000);
    assert_eq!(
        signals(&w.tick()),
        vec![(1, Kill::Kill)],
        "w1: no hb for 3 s"
    );
}

#[test]
fn a_lost_control_socket_is_a_death_replaced_before_the_reap() {
    let mut w = running();
    w.at(5000);
    let a = w.feed(Input::ControlClosed { n: 1 });
    assert_eq!(signals(&a), vec![(1, Kill::Kill)]);
    w.at(5100);
    assert_eq!(
        spawns(&w.tick()),
        vec![3],
        "replaced without waiting for the reap"
    );
    // The reap later only logs: no second replacement.
    w.at(5200);
    assert!(spawns(&w.exit(1)).is_empty());
    w.at(9000);
    assert!(spawns(&w.tick()).is_empty());
}

#[test]
fn stop_drains_then_kills_what_is_left_after_the_drain_time() {
    let mut w = running();
    w.at(100);
    let a = w.feed(Input::Signal(Signal::Stop("SIGTERM")));
    assert_eq!(signals(&a), vec![(1, Kill::Term), (2, Kill::Term)]);
    assert!(notified(&a, "STOPPING"));
    w.at(500);
    w.exit(1);
    w.at(2099);
    assert!(signals(&w.tick()).is_empty());
    w.at(2100);
    assert_eq!(signals(&w.tick()), vec![(2, Kill::Kill)]);
    w.exit(2);
    assert_eq!(w.rules.outcome(), Some(Outcome::Stopped));
}

fn unready(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Unready { n } => Some(*n),
            _ => None,
        })
        .collect()
}

/// Two workers, both ready, with a drain delay of 1 s.
fn running_with_delay() -> World {
    let mut w = World::new(2);
    w.rules.s.drain_delay = 1000 * MS;
    w.tick();
    w.ready(1);
    w.ready(2);
    w
}

#[test]
fn with_a_drain_delay_workers_turn_unready_first_and_get_sigterm_after_it() {
    let mut w = running_with_delay();
    w.at(100);
    let a = w.feed(Input::Signal(Signal::Stop("SIGTERM")));
    assert_eq!(unready(&a), vec![1, 2]);
    assert!(signals(&a).is_empty(), "no SIGTERM during the delay");
    assert!(notified(&a, "STOPPING"));
    assert_eq!(w.rules.next_deadline(), Some(w.t0 + 1100 * MS));
    // Heartbeats keep the workers alive; nothing else happens.
    w.at(1099);
    assert!(signals(&w.tick()).is_empty());
    // A worker that dies during the delay is not replaced.
    w.feed(Input::ControlClosed { n: 2 });
    let a = w.exit(2);
    assert!(spawns(&a).is_empty() && signals(&a).is_empty());
    w.at(1100);
    assert_eq!(signals(&w.tick()), vec![(1, Kill::Term)]);
    // The kill timer counts from the SIGTERM.
    w.at(3099);
    assert!(signals(&w.tick()).is_empty());
    w.at(3100);
    assert_eq!(signals(&w.tick()), vec![(1, Kill::Kill)]);
    w.exit(1);
    assert_eq!(w.rules.outcome(), Some(Outcome::Stopped));
}

#[test]
fn a_second_stop_during_the_drain_delay_kills_at_once() {
    let mut w = running_with_delay();
    w.feed(Input::Signal(Signal::Stop("SIGINT")));
    let a = w.feed(Input::Signal(Signal::Stop("SIGINT")));
    assert_eq!(signals(&a), vec![(1, Kill::Kill), (2, Kill::Kill)]);
    // Nothing is left to wait for: no SIGTERMs later, no deadline.
    assert_eq!(w.rules.next_deadline(), None);
    w.at(2000);
    assert!(signals(&w.tick()).is_empty());
    w.exit(1);
    w.exit(2);
    assert_eq!(w.rules.outcome(), Some(Outcome::Forced));
}

#[test]
fn workers_that_drain_by_themselves_during_the_delay_end_the_stop() {
    // Ctrl-C in a terminal reaches the workers too: they drain at once.
    let mut w = running_with_delay();
    w.feed(Input::Signal(Signal::Stop("SIGINT")));
    w.at(50);
    w.exit(1);
    w.exit(2);
    assert_eq!(w.rules.outcome(), Some(Outcome::Stopped));
}

#[test]
fn a_roll_has_no_drain_delay() {
    // The socket stays open and the replacement already accepts: the old
    // worker stops accepting at once, and the host never looks unready.
    let mut w = running_with_delay();
    w.feed(Input::Signal(Signal::Reload));
    let a = w.tick();
    assert_eq!(spawns(&a), vec![3]);
    let a = w.ready(3);
    assert_eq!(signals(&a), vec![(1, Kill::Term)]);
    assert!(unready(&a).is_empty());
}

#[test]
fn a_second_stop_kills_everything_at_once() {
    let mut w = running();
    w.feed(Input::Signal(Signal::Stop("SIGTERM")));
    let a = w.feed(Input::Signal(Signal::Stop("SIGINT")));
    assert_eq!(signals(&a), vec![(1, Kill::Kill), (2, Kill::Kill)]);
    w.exit(1);
    w.exit(2);
    assert_eq!(w.rules.outcome(), Some(Outcome::Forced));
}

#[test]
fn a_stop_while_starting_spawns_nothing_more() {
    let mut w = World::new(2);
    w.feed(Input::Signal(Signal::Stop("SIGTERM")));
    assert!(spawns(&w.tick()).is_empty());
    assert_eq!(w.rules.outcome(), Some(Outcome::Stopped));
}

#[test]
fn sighup_rolls_one_worker_at_a_time_new_ready_before_old_drains() {
    let mut w = running();
    w.at(100);
    let a = w.feed(Input::Signal(Signal::Reload));
    assert!(a.is_empty());
    let a = w.tick();
    assert!(notified(&a, "RELOADING"));
    assert_eq!(spawns(&a), vec![3], "one replacement at a time");
    assert!(
        signals(&a).is_empty(),
        "the old one serves until the new is ready"
    );
    let a = w.ready(3);
    assert_eq!(signals(&a), vec![(1, Kill::Term)]);
    assert!(spawns(&a).is_empty(), "the next waits for w1 to exit");
    let a = w.exit(1);
    assert_eq!(spawns(&a), vec![4]);
    let a = w.ready(4);
    assert_eq!(signals(&a), vec![(2, Kill::Term)]);
    let a = w.exit(2);
    assert!(notified(&a, "READY"), "the roll is done");
    assert_eq!(w.rules.workers(), vec![3, 4]);
    assert_eq!(w.rules.status().restarts, 0, "a roll is no restart");
}

#[test]
fn a_replacement_that_dies_before_ready_aborts_the_roll() {
    let mut w = running();
    w.feed(Input::Signal(Signal::Reload));
    assert_eq!(spawns(&w.tick()), vec![3]);
    let a = w.exit(3);
    assert!(signals(&a).is_empty(), "the old workers stay");
    assert!(spawns(&a).is_empty());
    assert_eq!(w.rules.workers(), vec![1, 2]);
    // Not in a roll any more: a later death is replaced as usual.
    w.at(5000);
    assert_eq!(spawns(&w.exit(1)), vec![4]);
}

#[test]
fn the_deadline_is_the_nearest_timer() {
    let mut w = World::new(1);
    w.tick();
    assert_eq!(
        w.rules.next_deadline(),
        Some(w.t0 + 1000 * MS),
        "ready timeout"
    );
    w.at(10);
    w.ready(1);
    assert_eq!(
        w.rules.next_deadline(),
        Some(w.now + 3000 * MS),
        "heartbeat timeout"
    );
}
