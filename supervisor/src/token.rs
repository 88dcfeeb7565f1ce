//! `tether token USER [--ttl SECS]`: prints a token for USER signed with
//! the secret from `--secret`/`TETHER_SECRET`, or else the dev-mode one
//! kept in `<data-dir>/secret`. Exit 2 for a bad user id or no secret (a
//! bad `--ttl` is a usage error clap reports, also exit 2).

use std::path::Path;
use std::process::ExitCode;

use tether_protocol::auth::{self, Secret};

use crate::config::Cli;
use crate::devmode::{read_secret, secret_path};

/// The default token lifetime: 24 h.
pub const DEFAULT_TTL_SECS: u64 = 24 * 60 * 60;

/// Why no token was printed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("invalid user id {0:?}: 1 to 64 characters of [A-Za-z0-9_.@-]")]
    BadUser(String),
    #[error("invalid --ttl: must be at least 1 second")]
    BadTtl,
    #[error(
        "no secret: set --secret or TETHER_SECRET, or run `tether` once in dev mode \
         (it creates {0})"
    )]
    NoSecret(String),
    #[error("{}", auth::weak_secret_message(.0))]
    Weak(auth::WeakSecret),
    #[error(transparent)]
    Dev(#[from] crate::devmode::DevError),
    #[error("signing: {0}")]
    Sign(#[from] auth::AuthError),
}

/// Makes a token for `user` valid `ttl` seconds, signed with `secret` or
/// else the dev-mode secret in `data_dir` (without printing it).
pub fn make(
    user: &str,
    ttl: u64,
    secret: Option<&str>,
    data_dir: &Path,
) -> Result<String, TokenError> {
    if !auth::valid_user_id(user) {
        return Err(TokenError::BadUser(user.to_string()));
    }
    if ttl == 0 {
        return Err(TokenError::BadTtl);
    }
    let secret = match secret {
        Some(s) => s.to_string(),
        None => read_secret(data_dir)?
            .ok_or_else(|| TokenError::NoSecret(secret_path(data_dir).display().to_string()))?,
    };
    auth::check_secret(&secret).map_err(TokenError::Weak)?;
    Ok(auth::issue(&Secret::new(secret.into_bytes()), user, ttl)?)
}

/// The subcommand: prints the token, or the error and exits 2 (1 if the
/// secret file could not be read).
pub fn main(user: &str, ttl: u64, cli: &Cli) -> ExitCode {
    match make(user, ttl, cli.secret.as_deref(), &cli.data_dir) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e @ TokenError::Dev(_)) => {
            eprintln!("tether token: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("tether token: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_with_the_given_secret_and_checks_the_user() {
        let dir = Path::new("/nonexistent");
        let k = Secret::generate_hex();
        let t = make("alice", 60, Some(&k), dir).unwrap();
        assert_eq!(
            auth::verify(&Secret::new(k.as_bytes().to_vec()), &t).unwrap(),
            "alice"
        );
        assert!(matches!(
            make("a b", 60, Some(&k), dir),
            Err(TokenError::BadUser(_))
        ));
        assert!(matches!(
            make("a", 0, Some(&k), dir),
            Err(TokenError::BadTtl)
        ));
        assert!(matches!(
            make("a", 60, Some("CHANGE-ME"), dir),
            Err(TokenError::Weak(_))
        ));
    }

    #[test]
    fn falls_back_to_the_dev_mode_secret_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            make("bob", DEFAULT_TTL_SECS, None, dir.path()),
            Err(TokenError::NoSecret(_))
        ));
        let (secret, _) = crate::devmode::load_or_create_secret(dir.path()).unwrap();
        let t = make("bob", DEFAULT_TTL_SECS, None, dir.path()).unwrap();
        assert_eq!(
            auth::verify(&Secret::new(secret.into_bytes()), &t).unwrap(),
            "bob"
        );
    }
}
