//! The error codes of the contract, in one place: each knows its HTTP
//! status and whether a retry hint goes with it, and a [`StoreError`]
//! maps to its code, message and retry hint once ([`StoreFailure`]), for
//! HTTP and WebSocket alike.

use crate::store::StoreError;

/// An error code of docs/PROTOCOL.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    BadFrame,
    UnknownType,
    InvalidField,
    InvalidSeq,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    RateLimited,
    NotSynced,
    DatabaseUnavailable,
    Draining,
    TooManyConnections,
    Internal,
}

impl ErrorCode {
    /// The code on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::InvalidSeq => "invalid_seq",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotSynced => "not_synced",
            ErrorCode::DatabaseUnavailable => "database_unavailable",
            ErrorCode::Draining => "draining",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status that carries it.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest
            | ErrorCode::BadFrame
            | ErrorCode::UnknownType
            | ErrorCode::NotSynced => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::InvalidField | ErrorCode::InvalidSeq => 422,
            ErrorCode::RateLimited => 429,
            ErrorCode::Internal => 500,
            ErrorCode::DatabaseUnavailable
            | ErrorCode::Draining
            | ErrorCode::TooManyConnections => 503,
        }
    }
}

/// What a client is told about a failed store operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreFailure {
    pub code: ErrorCode,
    /// Safe to show: internal details stay in the log.
    pub message: String,
    /// Seconds after which a retry may succeed.
    pub retry_after: Option<u64>,
}

impl From<&StoreError> for StoreFailure {
    fn from(e: &StoreError) -> StoreFailure {
        let (code, message, retry_after) = match e {
            StoreError::Unavailable(_) => (
                ErrorCode::DatabaseUnavailable,
                "the database is unavailable; nothing was written, retry later (with the same client_msg_id)".to_string(),
                Some(1),
            ),
            StoreError::NotFound(_) | StoreError::NotMember { .. } => {
                (ErrorCode::NotFound, e.to_string(), None)
            }
            StoreError::Forbidden(m) => (ErrorCode::Forbidden, m.clone(), None),
            StoreError::Invalid(m) => (ErrorCode::InvalidField, m.clone(), None),
            StoreError::Internal(_) => (ErrorCode::Internal, "internal error".to_string(), None),
        };
        StoreFailure {
            code,
            message,
            retry_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_once() {
        let f = StoreFailure::from(&StoreError::Unavailable("x".into()));
        assert_eq!(
            (f.code, f.retry_after),
            (ErrorCode::DatabaseUnavailable, Some(1))
        );
        assert_eq!(f.code.http_status(), 503);
        let f = StoreFailure::from(&StoreError::Forbidden("only the owner".into()));
        assert_eq!((f.code.as_str(), f.code.http_status()), ("forbidden", 403));
        let f = StoreFailure::from(&StoreError::NotMember {
            conversation_id: 1,
            user: "bob".into(),
        });
        assert_eq!(f.code.http_status(), 404);
        let f = StoreFailure::from(&StoreError::Internal("secret detail".into()));
        assert!(!f.message.contains("secret"), "internals stay in the log");
    }
}
