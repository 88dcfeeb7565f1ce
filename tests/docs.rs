//! The docs are anchored to the code: every source file that
//! docs/ARCHITECTURE.md and docs/LIFECYCLE.md name exists, and every
//! function they name as `Type::method` or `name` next to a file is
//! defined there. A rename that leaves a doc behind fails here.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where a file named in the docs may live.
const ROOTS: &[&str] = &[
    "",
    "worker/src",
    "supervisor/src",
    "protocol/src",
    "pgcluster/src",
    "client/src",
    "bench/src",
];

fn resolve(name: &str) -> Option<PathBuf> {
    ROOTS
        .iter()
        .map(|r| repo().join(r).join(name))
        .find(|p| p.exists())
}

/// The `*.rs` paths in backticks or plain text of a doc.
fn files_named(doc: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in doc.split(|c: char| !(c.is_ascii_alphanumeric() || "_/.-".contains(c))) {
        let word = word.trim_matches('.');
        if word.ends_with(".rs") && !word.starts_with('.') {
            out.push(word.to_string());
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Every Rust source file under the crates, as one text.
fn all_sources() -> String {
    fn walk(dir: &Path, out: &mut String) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    let mut out = String::new();
    for r in &ROOTS[1..] {
        walk(&repo().join(r), &mut out);
    }
    out
}

/// `Type::method` names in backticks.
fn methods_named(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for part in doc.split('`').skip(1).step_by(2) {
        let part = part.trim_end_matches("()");
        if let Some((ty, method)) = part.split_once("::") {
            let ident =
                |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if ident(ty)
                && ident(method)
                && ty.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                && method
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_lowercase())
            {
                out.push((ty.to_string(), method.to_string()));
            }
        }
    }
    out
}

#[test]
fn architecture_and_lifecycle_name_only_what_exists() {
    let sources = all_sources();
    for doc in ["docs/ARCHITECTURE.md", "docs/LIFECYCLE.md"] {
        let text = std::fs::read_to_string(repo().join(doc)).expect("the doc");
        let files = files_named(&text);
        assert!(!files.is_empty(), "{doc} names no file");
        for f in files {
            assert!(
                resolve(&f).is_some(),
                "{doc} names {f}, which does not exist"
            );
        }
        for (ty, method) in methods_named(&text) {
            let defines_type = [
                format!("struct {ty}"),
                format!("enum {ty}"),
                format!("impl {ty}"),
            ]
            .iter()
            .any(|d| sources.contains(d.as_str()));
            assert!(
                defines_type,
                "{doc} names {ty}::{method}, but no type {ty} exists"
            );
            assert!(
                sources.contains(&format!("fn {method}("))
                    || sources.contains(&format!("fn {method}<"))
                    || sources.contains(&format!("{method},"))
                    || sources.contains(&format!("{method} {{")),
                "{doc} names {ty}::{method}, which is defined nowhere"
            );
        }
    }
}
