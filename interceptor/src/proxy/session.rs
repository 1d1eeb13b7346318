//! Session persistence: the cookie that pins a client to one endpoint, read and written.

use http::header;
use tokio::sync::watch;

use crate::provider::{Endpoint, ReadyEndpoints};

/// The ready endpoint a request's session cookie names, if the cookie is well formed, not past
/// the route's absolute timeout, and its endpoint is still ready.
pub(super) fn pinned_endpoint(
    session: &crate::provider::SessionAffinity,
    headers: &http::HeaderMap,
    ready: &watch::Receiver<ReadyEndpoints>,
) -> Option<Endpoint> {
    let value = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == &*session.cookie)
        .map(|(_, value)| value.trim_matches('"'))?;
    let (id, issued) = value.split_once('.')?;
    let issued: u64 = issued.parse().ok()?;
    if let Some(timeout) = session.absolute_timeout {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs();
        if now.saturating_sub(issued) > timeout.as_secs() {
            return None;
        }
    }
    ready
        .borrow()
        .as_slice()
        .iter()
        .find(|e| crate::provider::session_id(e) == id)
        .cloned()
}

/// The Set-Cookie value pinning a session to `endpoint`: `<endpoint id>.<issued unix seconds>`,
/// HttpOnly, SameSite=Lax, Path=/, and Secure when the client's connection is HTTPS.
pub(super) fn session_cookie(
    session: &crate::provider::SessionAffinity,
    endpoint: &Endpoint,
    https: bool,
) -> String {
    let issued = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{}={}.{issued}; Path=/; HttpOnly; SameSite=Lax{}",
        session.cookie,
        crate::provider::session_id(endpoint),
        if https { "; Secure" } else { "" }
    )
}
