//! `tether token USER [--ttl SECS]`: prints a token for USER signed with
//! the secret from `--secret`/`TETHER_SECRET`, or else the dev-mode one
//! kept in `<data-dir>/secret`. Exit 2 for a bad user id or no secret.

use std::process::ExitCode;

use tether_shared::auth::{self, Secret};
use tether_shared::config::Flags;

use crate::config::secret_and_data_dir;
use crate::devmode::{read_secret, secret_path};

/// The default token lifetime: 24 h.
pub const DEFAULT_TTL_SECS: u64 = 24 * 60 * 60;

/// Why no token was printed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("usage: tether token USER [--ttl SECS]")]
    Usage,
    #[error("invalid user id {0:?}: 1 to 64 characters of [A-Za-z0-9_.@-]")]
    BadUser(String),
    #[error("invalid --ttl: {0}")]
    BadTtl(String),
    #[error(
        "no secret: set --secret or TETHER_SECRET, or run `tether` once in dev mode \
         (it creates {0})"
    )]
    NoSecret(String),
    #[error(transparent)]
    Dev(#[from] crate::devmode::DevError),
    #[error("signing: {0}")]
    Sign(#[from] auth::AuthError),
}

/// Makes the token (without printing it).
pub fn make(flags: &Flags) -> Result<String, TokenError> {
    let [_, user] = flags.positional.as_slice() else {
        return Err(TokenError::Usage);
    };
    if !auth::valid_user_id(user) {
        return Err(TokenError::BadUser(user.clone()));
    }
    let ttl: u64 = flags
        .get("ttl", "TETHER_TOKEN_TTL", DEFAULT_TTL_SECS)
        .map_err(|e| TokenError::BadTtl(e.to_string()))?;
    if ttl == 0 {
        return Err(TokenError::BadTtl("must be at least 1 second".into()));
    }
    let (secret, data_dir) = secret_and_data_dir(flags);
    let secret = match secret {
        Some(s) => s,
        None => read_secret(&data_dir)?
            .ok_or_else(|| TokenError::NoSecret(secret_path(&data_dir).display().to_string()))?,
    };
    Ok(auth::issue(&Secret::new(secret.into_bytes()), user, ttl)?)
}

/// The subcommand: prints the token, or the error and exits 2 (1 if the
/// secret file could not be read).
pub fn main(flags: &Flags) -> ExitCode {
    match make(flags) {
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
    use crate::config::{SWITCHES, VALUE_OPTIONS};

    fn flags(args: &[&str]) -> Flags {
        Flags::parse(args.iter().map(|s| s.to_string()), VALUE_OPTIONS, SWITCHES).unwrap()
    }

    #[test]
    fn signs_with_the_given_secret_and_checks_the_user() {
        let t = make(&flags(&["token", "alice", "--secret", "k", "--ttl", "60"])).unwrap();
        assert_eq!(
            auth::verify(&Secret::new(b"k".to_vec()), &t).unwrap(),
            "alice"
        );
        assert!(matches!(
            make(&flags(&["token", "a b", "--secret", "k"])),
            Err(TokenError::BadUser(_))
        ));
        assert!(matches!(
            make(&flags(&["token", "--secret", "k"])),
            Err(TokenError::Usage)
        ));
        assert!(matches!(
            make(&flags(&["token", "a", "--secret", "k", "--ttl", "x"])),
            Err(TokenError::BadTtl(_))
        ));
    }

    #[test]
    fn falls_back_to_the_dev_mode_secret_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        if std::env::var("TETHER_SECRET").is_ok() {
            return; // the environment would win
        }
        assert!(matches!(
            make(&flags(&["token", "bob", "--data-dir", d])),
            Err(TokenError::NoSecret(_))
        ));
        let (secret, _) = crate::devmode::load_or_create_secret(dir.path()).unwrap();
        let t = make(&flags(&["token", "bob", "--data-dir", d])).unwrap();
        assert_eq!(
            auth::verify(&Secret::new(secret.into_bytes()), &t).unwrap(),
            "bob"
        );
    }
}
