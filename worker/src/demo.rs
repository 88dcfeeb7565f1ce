//! The demo chat page at `/demo/`: static files compiled into the binary
//! (no files needed at run time), on top of the JavaScript SDK, which is
//! served as `/demo/tether-client.js`. Turned off with `TETHER_DEMO=off`
//! (`tether --no-demo`).
//!
//! The page reads its token from the URL fragment (`#token=...`), which a
//! browser never sends, so tokens do not reach request lines or logs.

use crate::respond::Body;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};

const INDEX_HTML: &str = include_str!("../../demo/index.html");
const APP_JS: &str = include_str!("../../demo/app.js");
const STYLE_CSS: &str = include_str!("../../demo/style.css");
const SDK_JS: &str = include_str!("../../clients/js/src/index.js");

/// The headers on every file of the demo (a favicon of `data:` is the one
/// thing the page loads that is not from this origin).
pub const PROTECTIVE_HEADERS: &[(&str, &str)] = &[
    (
        "content-security-policy",
        "default-src 'self'; connect-src 'self'; frame-ancestors 'none'; img-src 'self' data:",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
];

/// The response for a path under `/demo/`, or `None` if there is no such file.
pub fn serve(path: &str) -> Option<Response<Body>> {
    let (body, ctype) = match path {
        "/demo" | "/demo/" | "/demo/index.html" => (INDEX_HTML, "text/html; charset=utf-8"),
        "/demo/app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "/demo/style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        "/demo/tether-client.js" => (SDK_JS, "text/javascript; charset=utf-8"),
        _ => return None,
    };
    if path == "/demo" {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
        r.headers_mut()
            .insert("location", HeaderValue::from_static("/demo/"));
        return Some(r);
    }
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // The page talks only to this origin; nothing else may load it or
    // frame it, no type is sniffed, no referrer leaves.
    for (name, value) in PROTECTIVE_HEADERS {
        r.headers_mut()
            .insert(*name, HeaderValue::from_static(value));
    }
    Some(r)
}
