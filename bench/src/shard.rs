//! Spreading one scenario over several load processes (each process may
//! hold at most 20,000 descriptors here). The parent starts
//! `tether-bench SCENARIO --child --shard i/n ...`; a child prints
//! `BARRIER name` and waits for a line on stdin (the parent answers once
//! every child got there, after running its hook, e.g. measuring RSS), and
//! ends with `RESULT {json}`.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;

/// Which part of the clients a process runs.
#[derive(Debug, Clone, Copy)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    pub fn parse(s: &str) -> Result<Shard, String> {
        let (i, n) = s.split_once('/').ok_or("--shard wants i/n")?;
        let index: usize = i.parse().map_err(|_| "--shard wants i/n")?;
        let count: usize = n.parse().map_err(|_| "--shard wants i/n")?;
        if count == 0 || index >= count {
            return Err(format!("--shard {s}: need 0 <= i < n"));
        }
        Ok(Shard { index, count })
    }

    /// This shard's part of `0..total`.
    pub fn range(&self, total: usize) -> (usize, usize) {
        let lo = total * self.index / self.count;
        let hi = total * (self.index + 1) / self.count;
        (lo, hi)
    }
}

/// How a shard meets the others.
pub enum Coord<'a> {
    /// In-process: the hook runs at each barrier.
    Local(Box<dyn FnMut(&str) + Send + 'a>),
    /// A child: tell the parent, wait for its go.
    Child,
}

impl Coord<'_> {
    pub async fn barrier(&mut self, name: &str) {
        match self {
            Coord::Local(hook) => hook(name),
            Coord::Child => {
                println!("BARRIER {name}");
                let _ = std::io::stdout().flush();
                let _ = tokio::task::spawn_blocking(|| {
                    let mut line = String::new();
                    let _ = std::io::stdin().lock().read_line(&mut line);
                })
                .await;
            }
        }
    }
}

/// Runs `n` children with `args` (plus `--child --shard i/n`), calling
/// `hook` at each barrier once all children reached it; returns their
/// results.
pub fn run_children(
    args: &[String],
    n: usize,
    mut hook: impl FnMut(&str),
) -> Result<Vec<Value>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel::<(usize, Option<String>)>();
    let mut children = Vec::new();
    let mut stdins = Vec::new();
    for i in 0..n {
        let mut child = Command::new(&exe)
            .args(args)
            .arg("--child")
            .arg("--shard")
            .arg(format!("{i}/{n}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawning a load process: {e}"))?;
        stdins.push(child.stdin.take());
        let out = child.stdout.take().ok_or("no stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                match line {
                    Ok(l) => {
                        let _ = tx.send((i, Some(l)));
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send((i, None));
        });
        children.push(child);
    }
    drop(tx);
    let mut results: Vec<Option<Value>> = vec![None; n];
    let mut at_barrier = 0;
    let mut ended = 0;
    while ended < n {
        let Ok((i, line)) = rx.recv() else { break };
        match line {
            None => {
                ended += 1;
                if results[i].is_none() {
                    for c in children.iter_mut() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    return Err(format!("load process {i} ended without a result"));
                }
            }
            Some(l) => {
                if let Some(name) = l.strip_prefix("BARRIER ") {
                    at_barrier += 1;
                    if at_barrier == n {
                        hook(name);
                        at_barrier = 0;
                        for s in stdins.iter_mut().flatten() {
                            let _ = writeln!(s, "go");
                            let _ = s.flush();
                        }
                    }
                } else if let Some(json) = l.strip_prefix("RESULT ") {
                    results[i] = serde_json::from_str(json).ok();
                } else {
                    println!("[load {i}] {l}");
                }
            }
        }
    }
    let mut out = Vec::new();
    for (i, mut c) in children.into_iter().enumerate() {
        let status = c.wait().map_err(|e| e.to_string())?;
        match results[i].take() {
            Some(r) => out.push(r),
            None => return Err(format!("load process {i} gave no result ({status})")),
        }
    }
    Ok(out)
}
