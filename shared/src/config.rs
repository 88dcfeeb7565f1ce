//! Command-line flags that fall back to environment variables (flag wins).
//!
//! Twenty lines of our own instead of an argument-parsing dependency: both
//! binaries take a handful of `--name value` / `--name=value` options, each
//! also readable from an environment variable, as the contract requires.

use std::collections::HashMap;
use std::str::FromStr;

/// An error in the configuration, naming the option and the bad value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown option {0}")]
    Unknown(String),
    #[error("option {0} needs a value")]
    MissingValue(String),
    #[error("invalid value {value:?} for {name}: {reason}")]
    Invalid {
        name: String,
        value: String,
        reason: String,
    },
}

/// Parsed `--flag value` pairs plus positional arguments.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    values: HashMap<String, String>,
    switches: Vec<String>,
    /// Arguments that are not options, in order (e.g. `token alice`).
    pub positional: Vec<String>,
}

impl Flags {
    /// Parses `args` (without the program name). `known` lists the options
    /// that take a value, `switches` those that do not (both without `--`).
    pub fn parse<I: IntoIterator<Item = String>>(
        args: I,
        known: &[&str],
        switches: &[&str],
    ) -> Result<Flags, ConfigError> {
        let mut flags = Flags::default();
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let Some(name) = arg.strip_prefix("--") else {
                flags.positional.push(arg);
                continue;
            };
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (name.to_string(), None),
            };
            if switches.contains(&name.as_str()) {
                flags.switches.push(name);
            } else if known.contains(&name.as_str()) {
                let value = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .ok_or_else(|| ConfigError::MissingValue(format!("--{name}")))?,
                };
                flags.values.insert(name, value);
            } else {
                return Err(ConfigError::Unknown(format!("--{name}")));
            }
        }
        Ok(flags)
    }

    /// Whether a switch (an option without a value) was given.
    pub fn switch(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }

    /// The flag's value, else the environment variable's, else `None`.
    pub fn raw(&self, name: &str, env: &str) -> Option<String> {
        self.values
            .get(name)
            .cloned()
            .or_else(|| std::env::var(env).ok().filter(|v| !v.is_empty()))
    }

    /// The flag's or environment variable's value parsed, or `default`.
    pub fn get<T: FromStr>(&self, name: &str, env: &str, default: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.raw(name, env) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|e: T::Err| ConfigError::Invalid {
                name: format!("--{name}/{env}"),
                value: v.clone(),
                reason: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_env_and_parse_both_forms() {
        let f = Flags::parse(
            [
                "--listen=1.2.3.4:5",
                "--workers",
                "3",
                "token",
                "bob",
                "--dev",
            ]
            .map(String::from),
            &["listen", "workers"],
            &["dev"],
        )
        .unwrap();
        assert_eq!(f.raw("listen", "TETHER_TEST_UNSET_X").unwrap(), "1.2.3.4:5");
        assert_eq!(f.get("workers", "TETHER_TEST_UNSET_Y", 1usize).unwrap(), 3);
        assert_eq!(f.positional, vec!["token", "bob"]);
        assert!(f.switch("dev"));
        assert!(matches!(
            Flags::parse(["--nope".to_string()], &[], &[]),
            Err(ConfigError::Unknown(_))
        ));
        assert!(matches!(
            Flags::parse(["--workers".to_string()], &["workers"], &[]),
            Err(ConfigError::MissingValue(_))
        ));
        let bad = Flags::parse(["--workers=x".to_string()], &["workers"], &[]).unwrap();
        assert!(bad.get("workers", "TETHER_TEST_UNSET_Y", 1usize).is_err());
    }
}
