//! Log lines, one per event, for the supervisor and every worker: human
//! (`1733130000123 INFO  w1 user=bob conn=3: ...`, the default) or JSON
//! (`--log-format json`: one object per line with `ts`, `level`,
//! `process`, `msg`, and the `key=value` ids the message carries, such as
//! `user`, `conn`, `conversation`, `seq`, `pid`), for an aggregator. No
//! token or secret is ever part of a message, in either format.

use std::io::Write;

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Timestamp, level, process, message.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// The ids worth a field of their own when they appear as `key=value`.
const IDS: &[&str] = &["user", "conn", "conversation", "seq", "pid", "worker"];

/// The JSON line of one event.
pub fn json_line(ts_ms: u128, level: &str, process: &str, msg: &str) -> String {
    let mut obj = serde_json::Map::new();
    obj.insert("ts".into(), serde_json::Value::from(ts_ms as u64));
    obj.insert("level".into(), level.into());
    obj.insert("process".into(), process.into());
    for token in msg.split(|c: char| c.is_whitespace() || c == ':' || c == ',' || c == ';') {
        if let Some((k, v)) = token.split_once('=') {
            if IDS.contains(&k) && !v.is_empty() && !obj.contains_key(k) {
                obj.insert(
                    k.to_string(),
                    v.trim_matches(|c| c == '(' || c == ')').into(),
                );
            }
        }
    }
    obj.insert("msg".into(), msg.into());
    serde_json::Value::Object(obj).to_string()
}

/// Installs the logger for `process` (`sup`, `w1`, ...).
pub fn init(process: &str, format: LogFormat) {
    let tag = process.to_string();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |buf, record| match format {
            LogFormat::Human => writeln!(
                buf,
                "{} {:<5} {tag} {}",
                buf.timestamp_millis(),
                record.level(),
                record.args()
            ),
            LogFormat::Json => {
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0);
                let msg = record.args().to_string();
                writeln!(
                    buf,
                    "{}",
                    json_line(ts, record.level().as_str(), &tag, &msg)
                )
            }
        })
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_carry_the_ids() {
        let line = json_line(
            1,
            "INFO",
            "w1",
            "user=bob conversation=7 seq=42 added carol as member",
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["process"], "w1");
        assert_eq!(v["user"], "bob");
        assert_eq!(v["conversation"], "7");
        assert_eq!(v["seq"], "42");
        assert_eq!(
            v["msg"],
            "user=bob conversation=7 seq=42 added carol as member"
        );
        let v: serde_json::Value = serde_json::from_str(&json_line(
            1,
            "WARN",
            "sup",
            "sup: w3 pid=4242 died \"x\"\n",
        ))
        .unwrap();
        assert_eq!(v["pid"], "4242");
        assert_eq!(v["level"], "WARN");
    }
}
