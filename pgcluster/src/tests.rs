//! The cluster helper, really exercised: initdb, start, stop, restart,
//! temp dirs, running as the `postgres` user.

use super::*;
use postgres::{Client, NoTls};

fn test_opts() -> PgOptions {
    PgOptions {
        fsync: false,
        ..PgOptions::default()
    }
}

fn connect(url: &str) -> Result<Client, postgres::Error> {
    let mut config: postgres::Config = url.parse()?;
    config.connect_timeout(Duration::from_secs(5));
    config.connect(NoTls)
}

#[test]
fn temp_cluster_connects_stops_restarts_and_is_removed() {
    let started = Instant::now();
    let mut pg = PgCluster::start_temp(test_opts()).expect("start_temp");
    eprintln!("start_temp took {:?}", started.elapsed());
    assert!(pg.is_running());
    let url = pg.url();
    let port = pg.port();
    assert!(url.contains(&format!(":{port}/")), "{url}");

    let mut client = connect(&url).expect("connect");
    let one: i32 = client.query_one("SELECT 1", &[]).unwrap().get(0);
    assert_eq!(one, 1);
    let fsync: String = client.query_one("SHOW fsync", &[]).unwrap().get(0);
    assert_eq!(fsync, "off");
    drop(client);

    pg.stop().expect("stop");
    assert!(!pg.is_running());
    assert!(connect(&url).is_err(), "connect after stop must fail");
    pg.stop().expect("second stop is a no-op");

    pg.start().expect("start again");
    assert_eq!(pg.port(), port, "restart keeps the port");
    assert!(pg.is_running());
    let mut client = connect(&url).expect("connect after restart");
    client.batch_execute("SELECT 1").unwrap();
    drop(client);

    let root = pg.root_dir().to_path_buf();
    assert!(pg.data_dir().join("PG_VERSION").exists());
    drop(pg);
    assert!(!root.exists(), "temp dir {} left behind", root.display());
    assert!(connect(&url).is_err(), "server still up after drop");
}

#[test]
fn temp_clusters_in_parallel() {
    let handles: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(|| {
                let started = Instant::now();
                let pg = PgCluster::start_temp(PgOptions {
                    fsync: false,
                    max_connections: 300,
                    port: None,
                })
                .expect("start_temp");
                let took = started.elapsed();
                let mut client = connect(&pg.url()).expect("connect");
                let max: String = client
                    .query_one("SHOW max_connections", &[])
                    .unwrap()
                    .get(0);
                assert_eq!(max, "300");
                (pg.port(), took)
            })
        })
        .collect();
    let mut ports = Vec::new();
    for h in handles {
        let (port, took) = h.join().unwrap();
        eprintln!("parallel start_temp took {took:?}");
        ports.push(port);
    }
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 4, "each cluster has its own port");
}

#[test]
fn later_temp_clusters_copy_the_template() {
    // The first start_temp of the process may pay for initdb; the
    // following ones only copy the template.
    for i in 0..3 {
        let started = Instant::now();
        let pg = PgCluster::start_temp(test_opts()).expect("start_temp");
        eprintln!("sequential start_temp #{i} took {:?}", started.elapsed());
        connect(&pg.url()).expect("connect");
    }
}

#[test]
fn start_in_reuses_the_data() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("tether-data");
    {
        let started = Instant::now();
        let mut pg = PgCluster::start_in(&dir, test_opts()).expect("start_in (initdb)");
        eprintln!("start_in with initdb took {:?}", started.elapsed());
        let mut client = connect(&pg.url()).unwrap();
        client
            .batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42);")
            .unwrap();
        drop(client);
        pg.stop().unwrap();
    }
    {
        let pg = PgCluster::start_in(&dir, test_opts()).expect("start_in (reuse)");
        let mut client = connect(&pg.url()).unwrap();
        let v: i32 = client.query_one("SELECT v FROM kept", &[]).unwrap().get(0);
        assert_eq!(v, 42);
        // Dropped while running: stopped, data kept.
    }
    assert!(dir.join("pgdata").join("PG_VERSION").exists());
    let pg = PgCluster::start_in(&dir, test_opts()).expect("start_in (third)");
    let mut client = connect(&pg.url()).unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM kept", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[test]
fn fixed_port_is_used() {
    let port = free_port().unwrap();
    let pg = PgCluster::start_temp(PgOptions {
        fsync: false,
        max_connections: 20,
        port: Some(port),
    })
    .expect("start_temp on a given port");
    assert_eq!(pg.port(), port);
    connect(&pg.url()).expect("connect");
}

#[test]
fn taken_fixed_port_is_reported() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let err = PgCluster::start_temp(PgOptions {
        fsync: false,
        max_connections: 20,
        port: Some(port),
    })
    .expect_err("the port is taken");
    assert!(matches!(err, PgError::PortInUse { .. }), "{err}");
}

#[test]
fn finds_binaries() {
    let initdb = find_pg_bin("initdb").expect("initdb");
    assert!(is_executable(&initdb));
    // Debian's layout, without PATH.
    if Path::new("/usr/lib/postgresql").exists() {
        let p = find_pg_bin_in("pg_ctl", None, Path::new("/usr/lib/postgresql")).unwrap();
        assert!(p.starts_with("/usr/lib/postgresql"));
    }
    let err = find_pg_bin("no-such-pg-binary").unwrap_err();
    assert!(matches!(err, PgError::BinaryNotFound { .. }));
    assert!(err.to_string().contains("no-such-pg-binary"));
}

#[test]
fn stale_temp_dirs_are_swept() {
    let base = tempfile::tempdir().unwrap();
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = base.path().join(format!("tether-pg-{dead}-abc"));
    let stale_template = base.path().join(format!("tether-pg-template-{dead}-abc"));
    let live = base
        .path()
        .join(format!("tether-pg-{}-abc", std::process::id()));
    let other = base.path().join("unrelated-1-abc");
    for d in [&stale, &stale_template, &live, &other] {
        fs::create_dir_all(d.join("pgdata")).unwrap();
    }
    sweep_stale_temp_dirs(base.path());
    assert!(!stale.exists() && !stale_template.exists());
    assert!(live.exists() && other.exists());
}

#[test]
fn unreachable_dir_is_reported_when_root() {
    if !geteuid().is_root() {
        return;
    }
    let parent = tempfile::tempdir().unwrap();
    fs::set_permissions(parent.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let err = PgCluster::start_in(&parent.path().join("a").join("b"), test_opts())
        .expect_err("postgres cannot enter a root-only 0700 dir");
    assert!(matches!(err, PgError::NotReachable { .. }), "{err}");
}

#[test]
fn helpers() {
    assert_eq!(sh_quote("a b"), "'a b'");
    assert_eq!(sh_quote("it's"), r"'it'\''s'");
    assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
    assert_eq!(tail("", 2), "");
}
