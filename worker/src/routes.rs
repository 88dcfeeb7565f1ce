//! The routes of the contract, parsed once from a request's method and
//! path. Which methods an API route takes is decided in
//! [`crate::http`]'s dispatch (405 after authentication); a path that is no
//! route is 404 before any token is looked at.

use crate::request::percent_decode;
use hyper::Method;

/// A conversation id as given in a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConversationRef {
    Id(i64),
    /// Not a positive integer: no such conversation can exist.
    Invalid(String),
}

impl ConversationRef {
    fn parse(s: &str) -> ConversationRef {
        match s.parse::<i64>() {
            Ok(c) if c > 0 => ConversationRef::Id(c),
            _ => ConversationRef::Invalid(s.to_string()),
        }
    }
}

/// Every route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /health`
    Health,
    /// `GET /ready`
    Ready,
    /// `GET /metrics`
    Metrics,
    /// `GET /demo`, `GET /demo/...` (when the demo page is on)
    Demo,
    /// `GET /v1/ws`
    WebSocket,
    /// `GET /v1/sse`
    EventStream,
    /// `/v1/sse/tickets`
    Tickets,
    /// `/v1/conversations`
    Conversations,
    /// `/v1/conversations/{id}/members`
    Members(ConversationRef),
    /// `/v1/conversations/{id}/members/{user}` (the user percent-decoded)
    Member(ConversationRef, String),
    /// `/v1/conversations/{id}/messages`
    Messages(ConversationRef),
    /// `/v1/conversations/{id}/events`
    Events(ConversationRef),
    /// `/v1/conversations/{id}/cursor`
    Cursor(ConversationRef),
    /// `/v1/conversations/{id}/typing`
    Typing(ConversationRef),
    /// `/v1/conversations/{id}/presence`
    Presence(ConversationRef),
}

impl Route {
    /// The route of a request, or `None` (404). The probes, the demo page
    /// and the upgrade answer `GET` only; API routes any method.
    pub fn parse(method: &Method, path: &str, demo: bool) -> Option<Route> {
        if demo && *method == Method::GET && (path == "/demo" || path.starts_with("/demo/")) {
            return Some(Route::Demo);
        }
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let get = *method == Method::GET;
        let route = match segments.as_slice() {
            ["health"] if get => Route::Health,
            ["ready"] if get => Route::Ready,
            ["metrics"] if get => Route::Metrics,
            ["v1", "ws"] if get => Route::WebSocket,
            ["v1", "sse"] if get => Route::EventStream,
            ["v1", "sse", "tickets"] => Route::Tickets,
            ["v1", "conversations"] => Route::Conversations,
            ["v1", "conversations", id, "members"] => Route::Members(ConversationRef::parse(id)),
            ["v1", "conversations", id, "members", user] => {
                Route::Member(ConversationRef::parse(id), percent_decode(user))
            }
            ["v1", "conversations", id, "messages"] => Route::Messages(ConversationRef::parse(id)),
            ["v1", "conversations", id, "events"] => Route::Events(ConversationRef::parse(id)),
            ["v1", "conversations", id, "cursor"] => Route::Cursor(ConversationRef::parse(id)),
            ["v1", "conversations", id, "typing"] => Route::Typing(ConversationRef::parse(id)),
            ["v1", "conversations", id, "presence"] => Route::Presence(ConversationRef::parse(id)),
            _ => return None,
        };
        Some(route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Option<Route> {
        Route::parse(&Method::GET, path, true)
    }

    #[test]
    fn every_route_parses() {
        assert_eq!(get("/health"), Some(Route::Health));
        assert_eq!(get("/ready"), Some(Route::Ready));
        assert_eq!(get("/metrics"), Some(Route::Metrics));
        assert_eq!(get("/v1/ws"), Some(Route::WebSocket));
        assert_eq!(get("/v1/sse"), Some(Route::EventStream));
        assert_eq!(
            Route::parse(&Method::POST, "/v1/sse/tickets", false),
            Some(Route::Tickets)
        );
        assert_eq!(
            Route::parse(&Method::POST, "/v1/conversations/3/cursor", false),
            Some(Route::Cursor(ConversationRef::Id(3)))
        );
        assert_eq!(get("/demo/app.js"), Some(Route::Demo));
        assert_eq!(get("/v1/conversations"), Some(Route::Conversations));
        assert_eq!(
            get("/v1/conversations/7/members/bob%40x"),
            Some(Route::Member(ConversationRef::Id(7), "bob@x".into()))
        );
        assert_eq!(
            get("/v1/conversations/7/events"),
            Some(Route::Events(ConversationRef::Id(7)))
        );
        assert_eq!(
            Route::parse(&Method::POST, "/v1/conversations/9/messages", false),
            Some(Route::Messages(ConversationRef::Id(9)))
        );
    }

    #[test]
    fn ids_that_cannot_exist_and_unknown_paths() {
        assert_eq!(
            get("/v1/conversations/0/events"),
            Some(Route::Events(ConversationRef::Invalid("0".into())))
        );
        assert_eq!(
            get("/v1/conversations/-3/members"),
            Some(Route::Members(ConversationRef::Invalid("-3".into())))
        );
        assert_eq!(get("/v1/conversations/1/nope"), None);
        assert_eq!(get("/v2/ws"), None);
        assert_eq!(Route::parse(&Method::POST, "/health", true), None);
        assert_eq!(Route::parse(&Method::GET, "/demo/", false), None);
    }
}
