//! The option declarations against the contract and the environment.
use super::*;

fn parse(args: &[&str]) -> Result<WorkerArgs, clap::Error> {
    let argv = std::iter::once("tether-worker").chain(args.iter().copied());
    WorkerArgs::parse_from_args("tether-worker", argv)
}

const NEEDED: [&str; 4] = ["--database-url", "postgres://x/y", "--secret", "k"];

#[test]
fn the_declaration_is_consistent() {
    WorkerArgs::command().debug_assert();
}

#[test]
fn defaults_are_the_contracts() {
    let c = parse(&NEEDED).unwrap().into_config();
    assert_eq!(c.listen, "127.0.0.1:8080");
    assert_eq!(c.drain, Duration::from_millis(10_000));
    assert_eq!(c.max_body_bytes, 65_536);
    assert_eq!(c.max_frame_bytes, 262_144);
    assert_eq!(c.outbound_queue, 4096);
    assert_eq!(c.max_connections, 20_000);
    assert_eq!(c.idle_timeout, Duration::from_secs(60));
    assert_eq!(c.handshake_timeout, Duration::from_millis(5000));
    assert_eq!(c.pool_size, 16);
    assert_eq!(c.commit_lanes, 2);
    assert_eq!(c.max_batch, 512);
    assert_eq!(c.max_inflight, 256);
    assert_eq!(c.rate_limit, 50.0);
    assert_eq!(c.rate_burst, 200.0);
    assert_eq!(c.membership_rate, 10.0);
    assert_eq!(c.membership_burst, 100.0);
    assert_eq!(c.max_members, 10_000);
    assert_eq!(c.max_connections_per_user, 64);
    assert_eq!(c.max_connections_per_ip, 256);
    assert!(c.trusted_proxies.is_empty());
    assert_eq!(c.recent_cache_bytes, 64 << 20);
    assert_eq!(c.outbound_queue_bytes, 8 << 20);
    assert_eq!(c.body_timeout, Duration::from_millis(10_000));
    assert_eq!(c.token_public_key, None);
    assert!(c.demo);
}

#[test]
fn flags_in_both_forms_and_zero_lanes_count_as_one() {
    let mut args = NEEDED.to_vec();
    args.extend([
        "--max-batch=7",
        "--commit-lanes",
        "0",
        "--rate-limit",
        "2.5",
        "--demo",
        "off",
        "--worker-id",
        "w9",
    ]);
    let c = parse(&args).unwrap().into_config();
    assert_eq!(c.max_batch, 7);
    assert_eq!(c.commit_lanes, 1);
    assert_eq!(c.rate_limit, 2.5);
    assert!(!c.demo);
    assert_eq!(c.worker_id, "w9");
    // Given twice, the last one counts (as it always has).
    let mut twice = NEEDED.to_vec();
    twice.extend(["--pool-size", "1", "--pool-size", "2"]);
    assert_eq!(parse(&twice).unwrap().options.pool_size, 2);
}

#[test]
fn bad_unknown_and_missing_options_are_usage_errors() {
    use clap::error::ErrorKind;
    let kind = |args: &[&str]| parse(args).unwrap_err().kind();
    let mut bad = NEEDED.to_vec();
    bad.extend(["--max-batch", "many"]);
    assert_eq!(kind(&bad), ErrorKind::ValueValidation);
    let mut demo = NEEDED.to_vec();
    demo.extend(["--demo", "maybe"]);
    assert_eq!(kind(&demo), ErrorKind::ValueValidation);
    let mut cidr = NEEDED.to_vec();
    cidr.extend(["--proxy-protocol-from", "10.0.0.0/33"]);
    assert_eq!(kind(&cidr), ErrorKind::ValueValidation);
    let mut unknown = NEEDED.to_vec();
    unknown.push("--nope");
    assert_eq!(kind(&unknown), ErrorKind::UnknownArgument);
    let mut extra = NEEDED.to_vec();
    extra.push("stray");
    assert_eq!(kind(&extra), ErrorKind::UnknownArgument);
    assert!(parse(&[]).unwrap_err().exit_code() == 2);
    assert_eq!(parse(&["--help"]).unwrap_err().exit_code(), 0);
}

#[test]
fn options_become_each_options_own_variable() {
    let matches = WorkerArgs::command()
        .try_get_matches_from(
            ["tether-worker", "--max-body-bytes", "10", "--demo=off"]
                .into_iter()
                .chain(NEEDED),
        )
        .unwrap();
    let env = WorkerOptions::env(&matches);
    let get = |k: &str| {
        env.iter()
            .find(|(var, _)| var == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("TETHER_MAX_BODY_BYTES"), Some("10"));
    assert_eq!(get("TETHER_DEMO"), Some("off"));
    // Not given: the default, so a worker runs with what --help showed.
    assert_eq!(get("TETHER_POOL_SIZE"), Some("16"));
    // Every worker option with a value (given or a default), and only
    // those (never the secret); an optional one not given is not set.
    let n = WorkerOptions::augment_args(clap::Command::new("x"))
        .get_arguments()
        .filter(|a| !a.get_default_values().is_empty())
        .count();
    assert_eq!(env.len(), n);
    assert_eq!(get("TETHER_SECRET"), None);
    assert_eq!(get("TETHER_READ_DATABASE_URL"), None);
    assert_eq!(get("TETHER_PROXY_PROTOCOL_FROM"), None);
    // A list is handed on whole.
    let matches = WorkerArgs::command()
        .try_get_matches_from(
            ["tether-worker", "--proxy-protocol-from", "10.0.0.0/8,::1"]
                .into_iter()
                .chain(NEEDED),
        )
        .unwrap();
    let env = WorkerOptions::env(&matches);
    assert!(env.contains(&(
        "TETHER_PROXY_PROTOCOL_FROM".to_string(),
        "10.0.0.0/8,::1".to_string()
    )));
}
