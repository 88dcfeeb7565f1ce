//! The command lines of `tether`, `tether worker` and `tether-worker` as an
//! operator meets them: `--help` (exit 0, every worker option with its
//! variable and default), usage errors (exit 2, naming the option),
//! `tether token`, and worker options given to `tether` reaching the
//! workers it starts (on the command line and in the environment).

use std::process::{Command, Output};

use serde_json::json;
use tether_protocol::auth::{self, Secret};
use tether_testkit::*;

fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin);
    // Only what the test sets: no TETHER_* or DATABASE_URL from outside.
    for (key, _) in std::env::vars_os() {
        if key
            .to_str()
            .is_some_and(|k| k.starts_with("TETHER_") || k == "DATABASE_URL")
        {
            cmd.env_remove(&key);
        }
    }
    cmd.args(args).envs(env.iter().copied());
    cmd.output().unwrap_or_else(|e| panic!("{bin}: {e}"))
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

const TETHER: &str = env!("CARGO_BIN_EXE_tether");
const WORKER: &str = env!("CARGO_BIN_EXE_tether-worker");

#[test]
fn help_lists_every_worker_option_with_its_variable_and_default() {
    for (bin, args) in [
        (TETHER, &["--help"][..]),
        (TETHER, &["worker", "--help"][..]),
        (WORKER, &["--help"][..]),
    ] {
        let out = run(bin, args, &[]);
        let help = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{bin} {args:?}: {help}");
        for needle in [
            "--max-body-bytes",
            "TETHER_MAX_BODY_BYTES",
            "[default: 65536]",
            "--rate-limit",
            "TETHER_RATE_LIMIT",
            "--pool-size",
            "[default: 16]",
            "--commit-lanes",
            "TETHER_COMMIT_LANES",
            "--drain-ms",
            "--demo",
            "--database-url",
            "DATABASE_URL",
        ] {
            assert!(
                help.contains(needle),
                "{bin} {args:?}: no {needle}:\n{help}"
            );
        }
    }
    let help = text(&run(TETHER, &["--help"], &[]).stdout);
    for needle in ["--workers", "--max-restarts", "--no-demo", "token"] {
        assert!(help.contains(needle), "no {needle}:\n{help}");
    }
    // A secret in the environment is never shown.
    let out = run(TETHER, &["--help"], &[("TETHER_SECRET", "hush-hush")]);
    assert!(!text(&out.stdout).contains("hush-hush"));
}

/// A command line that must fail: binary, arguments, environment, and
/// what its error message must name.
type BadCase<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn bad_command_lines_exit_2_and_say_why() {
    let cases: &[BadCase] = &[
        (TETHER, &["--nope"], &[], "--nope"),
        (TETHER, &["--workers", "0"], &[], "--workers"),
        (TETHER, &["--max-batch", "many"], &[], "--max-batch"),
        (TETHER, &["--no-demo", "--demo", "on"], &[], "--no-demo"),
        (
            TETHER,
            &[],
            &[("TETHER_RATE_LIMIT", "fast")],
            "--rate-limit",
        ),
        (TETHER, &["frobnicate"], &[], "frobnicate"),
        (TETHER, &["worker", "--nope"], &[], "--nope"),
        (TETHER, &["token"], &[], "<USER>"),
        (TETHER, &["token", "a", "--ttl", "0"], &[], "--ttl"),
        (WORKER, &["--secret", "k"], &[], "--database-url"),
        (
            WORKER,
            &[
                "--secret",
                "k",
                "--database-url",
                "postgres://x",
                "--demo",
                "maybe",
            ],
            &[],
            "--demo",
        ),
    ];
    for (bin, args, env, needle) in cases {
        let out = run(bin, args, env);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bin} {args:?} {env:?}: {err}");
        assert!(err.contains(needle), "{bin} {args:?}: no {needle} in {err}");
    }
}

#[test]
fn token_prints_a_token_signed_with_the_secret() {
    for args in [
        &["token", "alice", "--secret", TEST_SECRET, "--ttl", "60"][..],
        &["--secret", TEST_SECRET, "token", "alice"][..],
    ] {
        let out = run(TETHER, args, &[]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let token = text(&out.stdout);
        assert_eq!(
            auth::verify(&Secret::new(TEST_SECRET.as_bytes().to_vec()), token.trim()).unwrap(),
            "alice"
        );
    }
    let out = run(TETHER, &["token", "bob"], &[("TETHER_SECRET", TEST_SECRET)]);
    let token = text(&out.stdout);
    assert_eq!(
        auth::verify(&Secret::new(TEST_SECRET.as_bytes().to_vec()), token.trim()).unwrap(),
        "bob"
    );
}

/// `tether --max-body-bytes 16` (and the same as a variable) limits the
/// bodies every worker accepts; `--no-demo` turns the page off in them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_options_given_to_tether_reach_its_workers() {
    let db = TestDb::new_async().await;
    for (args, env) in [
        (&["--max-body-bytes", "16", "--no-demo"][..], &[][..]),
        (
            &[][..],
            &[("TETHER_MAX_BODY_BYTES", "16"), ("TETHER_DEMO", "off")][..],
        ),
    ] {
        let url = db.url();
        let cluster = tokio::task::spawn_blocking(move || {
            ClusterProc::spawn_with(&url, TEST_SECRET, 2, args, env)
        })
        .await
        .unwrap();
        let c = create_conversation(cluster.addr(), "alice", &["bob"]).await;
        let path = format!("/v1/conversations/{c}/messages");
        // Several requests, one connection each: both workers answer some.
        for i in 0..6 {
            let ok = http(
                cluster.addr(),
                "POST",
                &path,
                Some(&tok("alice")),
                Some(&json!({"body": "y".repeat(16), "client_msg_id": format!("ok{i}")})),
            )
            .await;
            assert_eq!(ok.status, 201, "{args:?} {env:?}: {}", ok.body);
            let big = http(
                cluster.addr(),
                "POST",
                &path,
                Some(&tok("alice")),
                Some(&json!({"body": "y".repeat(17), "client_msg_id": format!("big{i}")})),
            )
            .await;
            assert_eq!(big.status, 413, "{args:?} {env:?}: {}", big.body);
            let demo = http(cluster.addr(), "GET", "/demo/", None, None).await;
            assert_eq!(demo.status, 404, "{args:?} {env:?}: the demo page is on");
        }
    }
}
