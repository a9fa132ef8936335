//! Who may see and do what on the console and its API.
//!
//! - Read-only pages and API calls are open on a loopback listener; on any other listener
//!   they need the admin token (start-up refuses such a listener without one,
//!   [`crate::config::HttpSettings::check_console_access`]).
//! - Every action (replay, cancel, purge) needs the token, wherever the listener is: through
//!   the API as a bearer token; through the console's forms as a session, each form carrying
//!   a CSRF token derived from the admin token.
//! - The token is sent as `Authorization: Bearer <token>`, or typed once into `/login`, which
//!   sets a session cookie (`HttpOnly`, `SameSite=Strict`, 12 hours): when it was issued,
//!   signed with the token. Replicas with one token accept each other's sessions, and a new
//!   token ends every session.
//!
//! Tokens and cookies are compared as HMAC tags, in constant time.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use ring::hmac;
use secrecy::{ExposeSecret, SecretString};

use super::Console;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "instructd_session";

/// What a request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// Sent the admin token as a bearer token: may read and act.
    Admin,
    /// Holds a session made with the token (a browser): may read, and act through the
    /// console's forms, which carry the CSRF token.
    Session,
    /// Holds nothing, on a loopback listener: may read.
    Local,
}

impl Caller {
    /// Who the caller is, as actions are logged.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin (bearer token)",
            Self::Session => "admin (console session)",
            Self::Local => "local",
        }
    }
}

/// The token's checks, made once at start-up.
pub struct Access {
    /// Keyed with the token: signs the session cookie's value.
    token_key: Option<hmac::Key>,
    /// The token's tag under a key of this process: a presented token is verified against
    /// it without comparing the secret byte by byte.
    token_tag: Option<(hmac::Key, hmac::Tag)>,
    /// Read-only pages need no token (a loopback listener).
    open_reads: bool,
}

/// What a session cookie holds: this, signed with the token.
const SESSION_PURPOSE: &[u8] = b"instructd console session v1";

/// How long a console session lasts; then the browser signs in again.
pub const SESSION_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

fn session_message(issued: u64) -> Vec<u8> {
    [SESSION_PURPOSE, b":", issued.to_string().as_bytes()].concat()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_secs())
}

/// What the console's forms carry against cross-site requests: this, signed with the token.
const CSRF_PURPOSE: &[u8] = b"instructd console form v1";

impl Access {
    /// `token`: the admin token, empty for none; `loopback`: whether the listener is
    /// loopback only.
    pub fn new(token: &SecretString, loopback: bool) -> Self {
        let token = token.expose_secret().trim();
        let (token_key, token_tag) = if token.is_empty() {
            (None, None)
        } else {
            let rng = ring::rand::SystemRandom::new();
            let process_key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).expect("the system's random source works");
            let tag = hmac::sign(&process_key, token.as_bytes());
            (Some(hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes())), Some((process_key, tag)))
        };
        Self { token_key, token_tag, open_reads: loopback }
    }

    /// Whether `presented` is the admin token.
    pub fn is_token(&self, presented: &str) -> bool {
        self.token_tag
            .as_ref()
            .is_some_and(|(key, tag)| hmac::verify(key, presented.trim().as_bytes(), tag.as_ref()).is_ok())
    }

    /// The session cookie's value for a caller who gave the token: when it was issued, signed
    /// with the token; `None` without a token.
    pub fn session_value(&self) -> Option<String> {
        self.session_issued_at(unix_now())
    }

    fn session_issued_at(&self, issued: u64) -> Option<String> {
        let key = self.token_key.as_ref()?;
        Some(format!("{issued}.{}", hex(hmac::sign(key, &session_message(issued)).as_ref())))
    }

    /// Whether `value` is a session this token signed less than [`SESSION_MAX_AGE`] ago.
    fn is_session(&self, value: &str) -> bool {
        let Some((issued, tag)) = value.split_once('.') else { return false };
        let (Some(key), Ok(issued), Some(tag)) = (self.token_key.as_ref(), issued.parse::<u64>(), unhex(tag)) else {
            return false;
        };
        let now = unix_now();
        let fresh = issued <= now.saturating_add(60) && now.saturating_sub(issued) < SESSION_MAX_AGE.as_secs();
        fresh && hmac::verify(key, &session_message(issued), &tag).is_ok()
    }

    /// Who sent `headers`: the token (bearer or session cookie) makes an admin; without it,
    /// a caller on a loopback listener may read; anyone else is nobody.
    pub fn caller(&self, headers: &HeaderMap) -> Option<Caller> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        if bearer.is_some_and(|token| self.is_token(token)) {
            return Some(Caller::Admin);
        }
        if session_cookie(headers).is_some_and(|value| self.is_session(value)) {
            return Some(Caller::Session);
        }
        self.open_reads.then_some(Caller::Local)
    }

    /// Whether a token is configured (actions are possible at all).
    pub fn has_token(&self) -> bool {
        self.token_tag.is_some()
    }

    /// The token a console form carries for a signed-in caller; `None` without a token.
    pub fn csrf_token(&self) -> Option<String> {
        let key = self.token_key.as_ref()?;
        Some(hex(hmac::sign(key, CSRF_PURPOSE).as_ref()))
    }

    /// Whether a form posted by `caller` with `csrf` may act: a bearer caller always, a
    /// session only with the form's CSRF token (a cross-site post carries the cookie, not
    /// the token), nobody else.
    pub fn may_act(&self, caller: Caller, csrf: &str) -> bool {
        match caller {
            Caller::Admin => true,
            Caller::Session => {
                let (Some(key), Some(tag)) = (self.token_key.as_ref(), unhex(csrf)) else { return false };
                hmac::verify(key, CSRF_PURPOSE, &tag).is_ok()
            }
            Caller::Local => false,
        }
    }
}

/// The value of the session cookie in `headers`, if any.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|cookies| cookies.split(';'))
        .filter_map(|cookie| cookie.trim().split_once('='))
        .find_map(|(name, value)| (name == SESSION_COOKIE).then_some(value))
}

/// Whether the request's `Host` names this machine's loopback: `localhost`, a `127.0.0.0/8`
/// address or `[::1]`, with or without a port.
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|value| value.to_str().ok()) else { return false };
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 128 {
        return None;
    }
    (0..text.len()).step_by(2).map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok()).collect()
}

/// Lets a request through to the console's read-only routes if its caller may read: an
/// API call without that gets a JSON 401, a page a redirect to `/login`.
pub async fn require_reader(State(console): State<Console>, mut request: Request, next: Next) -> Response {
    match console.access.caller(request.headers()) {
        // Without a token, only a page asked for by a loopback name: a web page that
        // rebinds its own name to 127.0.0.1 cannot read the console from the operator's
        // browser (DNS rebinding).
        Some(Caller::Local) if !loopback_host(request.headers()) => {
            let body = serde_json::json!({
                "error": "without the admin token, the console answers only to a loopback name (localhost, 127.0.0.1, [::1])"
            });
            (StatusCode::FORBIDDEN, axum::Json(body)).into_response()
        }
        Some(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        None if request.uri().path().starts_with("/api/") => unauthorized(),
        None => Redirect::to("/login").into_response(),
    }
}

/// Lets an API action through only with the admin token as a bearer token (a browser's
/// session acts through the console's forms instead, which carry the CSRF token).
pub async fn require_admin(State(console): State<Console>, mut request: Request, next: Next) -> Response {
    match console.access.caller(request.headers()) {
        Some(Caller::Admin) => {
            request.extensions_mut().insert(Caller::Admin);
            next.run(request).await
        }
        _ => unauthorized(),
    }
}

/// The API's answer to a caller without the token.
pub fn unauthorized() -> Response {
    let body = serde_json::json!({
        "error": "this needs the admin token (http.admin_token_file), as `Authorization: Bearer <token>`"
    });
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    const TOKEN: &str = "0123456789abcdef-token";

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn the_token_or_its_session_makes_an_admin_and_nothing_else_does() {
        let access = Access::new(&SecretString::from(TOKEN), false);
        let bearer = format!("Bearer {TOKEN}");
        assert_eq!(access.caller(&headers(&[(header::AUTHORIZATION, &bearer)])), Some(Caller::Admin));
        let session = access.session_value().unwrap();
        let cookie = format!("theme=dark; {SESSION_COOKIE}={session}");
        assert_eq!(access.caller(&headers(&[(header::COOKIE, &cookie)])), Some(Caller::Session));
        for wrong in [
            (header::AUTHORIZATION, "Bearer 0123456789abcdef-tokeN".to_owned()),
            (header::AUTHORIZATION, format!("Basic {TOKEN}")),
            (header::COOKIE, format!("{SESSION_COOKIE}={}", &session[..session.len() - 2])),
            (header::COOKIE, format!("{SESSION_COOKIE}={TOKEN}")),
            (header::COOKIE, format!("{SESSION_COOKIE}=zz")),
        ] {
            assert_eq!(access.caller(&headers(&[(wrong.0.clone(), &wrong.1)])), None, "{wrong:?}");
        }
        assert_eq!(access.caller(&HeaderMap::new()), None);
    }

    #[test]
    fn without_a_token_only_a_loopback_name_is_answered() {
        for host in ["localhost", "localhost:9464", "LOCALHOST:1", "127.0.0.1:9464", "127.1.2.3", "[::1]:9464", "[::1]"]
        {
            assert!(loopback_host(&headers(&[(header::HOST, host)])), "{host}");
        }
        for host in ["evil.example:9464", "evil.example", "10.0.0.1:9464", "localhost.evil.example", "[::2]:80", ""] {
            assert!(!loopback_host(&headers(&[(header::HOST, host)])), "{host}");
        }
        assert!(!loopback_host(&HeaderMap::new()));
    }

    #[test]
    fn a_session_acts_only_with_the_forms_csrf_token() {
        let access = Access::new(&SecretString::from(TOKEN), true);
        let csrf = access.csrf_token().unwrap();
        assert_ne!(Some(csrf.clone()), access.session_value(), "the form's token is not the cookie's");
        assert!(access.may_act(Caller::Session, &csrf));
        assert!(!access.may_act(Caller::Session, ""));
        assert!(!access.may_act(Caller::Session, &access.session_value().unwrap()));
        assert!(access.may_act(Caller::Admin, ""));
        assert!(!access.may_act(Caller::Local, &csrf), "on loopback too, acting needs the token");
    }

    #[test]
    fn a_loopback_listener_lets_anyone_read_and_no_token_makes_no_admin() {
        let access = Access::new(&SecretString::from(""), true);
        assert_eq!(access.caller(&HeaderMap::new()), Some(Caller::Local));
        assert!(!access.has_token());
        assert!(!access.is_token(""));
        assert_eq!(access.session_value(), None);
        assert_eq!(access.csrf_token(), None);
        assert_eq!(access.caller(&headers(&[(header::AUTHORIZATION, "Bearer ")])), Some(Caller::Local));
    }

    #[test]
    fn a_session_ends_after_its_max_age() {
        let access = Access::new(&SecretString::from(TOKEN), false);
        let now = unix_now();
        let cookie = |issued: u64| format!("{SESSION_COOKIE}={}", access.session_issued_at(issued).unwrap());
        let fresh = cookie(now - SESSION_MAX_AGE.as_secs() + 60);
        assert_eq!(access.caller(&headers(&[(header::COOKIE, &fresh)])), Some(Caller::Session));
        for stale in [cookie(now - SESSION_MAX_AGE.as_secs() - 1), cookie(now + 3600)] {
            assert_eq!(access.caller(&headers(&[(header::COOKIE, &stale)])), None, "{stale}");
        }
        // A forged time under a real signature does not pass.
        let real = access.session_issued_at(now).unwrap();
        let forged = format!("{SESSION_COOKIE}={}{}", now + 1, &real[real.find('.').unwrap()..]);
        assert_eq!(access.caller(&headers(&[(header::COOKIE, &forged)])), None);
    }

    #[test]
    fn another_token_ends_the_sessions_of_the_first() {
        let first = Access::new(&SecretString::from(TOKEN), false);
        let second = Access::new(&SecretString::from("another-token-of-16-chars"), false);
        let cookie = format!("{SESSION_COOKIE}={}", first.session_value().unwrap());
        assert_eq!(second.caller(&headers(&[(header::COOKIE, &cookie)])), None);
        // Replicas with the same token accept each other's sessions.
        let replica = Access::new(&SecretString::from(TOKEN), false);
        assert_eq!(replica.caller(&headers(&[(header::COOKIE, &cookie)])), Some(Caller::Session));
    }
}
