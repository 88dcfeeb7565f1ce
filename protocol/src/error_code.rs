//! The error codes of the contract, in one place: each knows its wire
//! name and its HTTP status. (The worker maps its store errors to a code
//! once, in `tether_worker::store::StoreFailure`.)

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
    TooManyMembers,
    RequestTimeout,
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
            ErrorCode::TooManyMembers => "too_many_members",
            ErrorCode::RequestTimeout => "request_timeout",
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
            ErrorCode::RequestTimeout => 408,
            ErrorCode::InvalidField | ErrorCode::InvalidSeq | ErrorCode::TooManyMembers => 422,
            ErrorCode::RateLimited => 429,
            ErrorCode::Internal => 500,
            ErrorCode::DatabaseUnavailable
            | ErrorCode::Draining
            | ErrorCode::TooManyConnections => 503,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_their_status() {
        assert_eq!(ErrorCode::Forbidden.as_str(), "forbidden");
        assert_eq!(ErrorCode::Forbidden.http_status(), 403);
        assert_eq!(ErrorCode::DatabaseUnavailable.http_status(), 503);
        assert_eq!(ErrorCode::InvalidField.http_status(), 422);
        assert_eq!(ErrorCode::TooManyMembers.as_str(), "too_many_members");
        assert_eq!(ErrorCode::TooManyMembers.http_status(), 422);
        assert_eq!(ErrorCode::RequestTimeout.http_status(), 408);
    }
}
