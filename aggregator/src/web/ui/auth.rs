//! Who may read and who may change things through the on-call web view.
//!
//! Reading: `[auth] read_only` — `public` (anyone who can connect) or `login`; unset, it
//! is public while the HTTP listener is on loopback. Changing: always a signed-in
//! person. One signs in with
//! - a configured user (`[[auth.user]] name, password_file`; the file holds an argon2
//!   PHC hash or the plain password), or
//! - the API token (`auth.api_token_file`) and the name to record on the timeline, or
//! - on a loopback listener with neither token nor users configured, only a name (the
//!   JSON API accepts changes from anyone there too).
//!
//! A session is a signed cookie (`tocsin_session`, HttpOnly, SameSite=Strict): the user
//! name, an expiry and a nonce under an HMAC-SHA256 with a key drawn at startup (so a
//! restart signs everyone out). No session state is kept on the server. Each form
//! carries a CSRF token — an HMAC of the session cookie under the same key — which every
//! POST must return. This module owns the policy; it does not render pages.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use tocsin_agent::config::Secret;
use tocsin_agent::settings::Validator;

use crate::config::RawAuth;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "tocsin_session";

/// How long a session lasts after signing in (a working day and a night shift).
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Who may read the on-call view (`auth.read_only`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadAccess {
    /// Anyone who can connect.
    Public,
    /// A signed-in person only; others are sent to the login page.
    Login,
}

/// A person who may sign in (`[[auth.user]]`).
#[derive(Clone)]
pub struct WebUser {
    /// Login name; the timeline shows `user:NAME`.
    pub name: String,
    password: Password,
}

impl std::fmt::Debug for WebUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebUser")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What a password file holds.
#[derive(Clone)]
enum Password {
    /// An argon2 PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`).
    Argon2(String),
    /// The password itself.
    Plain(Secret),
}

impl WebUser {
    /// A user whose password file holds `text` (already trimmed): an argon2 PHC hash
    /// when it starts with `$argon2`, else the plain password.
    ///
    /// # Errors
    /// A message when `text` is empty, an unparseable argon2 hash, or another kind of
    /// hash (`$2b$…` bcrypt, `$6$…` crypt) that would otherwise be taken as a password.
    pub fn new(name: &str, text: &str) -> Result<Self, String> {
        let password = if text.is_empty() {
            return Err("the password file is empty".into());
        } else if text.starts_with("$argon2") {
            let h = argon2::PasswordHash::new(text)
                .map_err(|e| format!("not a valid argon2 hash: {e}"))?;
            argon2::Params::try_from(&h).map_err(|e| format!("not a valid argon2 hash: {e}"))?;
            if h.salt.is_none() || h.hash.is_none() {
                return Err("not a valid argon2 hash: it lacks the salt or the hash".into());
            }
            Password::Argon2(text.to_owned())
        } else if text.starts_with('$') && text[1..].contains('$') && !text.contains(' ') {
            return Err(
                "looks like a crypt/bcrypt hash; only argon2 hashes ($argon2id$…) or a plain password are supported"
                    .into(),
            );
        } else {
            Password::Plain(Secret::new(text.to_owned()))
        };
        Ok(WebUser {
            name: name.to_owned(),
            password,
        })
    }

    /// Whether `given` is this user's password (constant time for plain passwords;
    /// argon2 verification costs tens of milliseconds of CPU: call it off the runtime).
    pub fn verify(&self, given: &str) -> bool {
        match &self.password {
            Password::Argon2(phc) => {
                use argon2::PasswordVerifier as _;
                argon2::PasswordHash::new(phc).is_ok_and(|h| {
                    argon2::Argon2::default()
                        .verify_password(given.as_bytes(), &h)
                        .is_ok()
                })
            }
            Password::Plain(s) => ct_eq(given.as_bytes(), s.expose().as_bytes()),
        }
    }
}

/// The web view's access policy, validated from `[auth]`.
#[derive(Debug, Clone)]
pub struct WebAuth {
    /// Who may read.
    pub read: ReadAccess,
    /// Who may sign in with a password.
    pub users: Vec<WebUser>,
}

impl Default for WebAuth {
    fn default() -> Self {
        WebAuth {
            read: ReadAccess::Public,
            users: Vec::new(),
        }
    }
}

/// Validates `auth.read_only` and `[[auth.user]]`, recording every problem with its key.
/// `loopback`: whether `listen_http` is a loopback address (the default of `read_only`).
pub fn validate(v: &mut Validator<'_>, raw: &RawAuth, loopback: bool) -> WebAuth {
    let read = match raw.read_only.as_deref() {
        None => {
            if loopback {
                ReadAccess::Public
            } else {
                ReadAccess::Login
            }
        }
        Some("public") => ReadAccess::Public,
        Some("login") => ReadAccess::Login,
        Some(other) => {
            v.problem(
                "auth.read_only",
                format!("{other:?}: expected \"public\" or \"login\""),
            );
            ReadAccess::Login
        }
    };
    let mut users: Vec<WebUser> = Vec::new();
    for (i, u) in raw.user.iter().enumerate() {
        let key = format!("auth.user.{i}");
        let name = u.name.trim();
        if !crate::web::ui::valid_name(name) {
            v.problem(
                &format!("{key}.name"),
                format!("{:?}: 1 to 128 printable characters", u.name),
            );
            continue;
        }
        if users.iter().any(|o| o.name == name) {
            v.problem(&format!("{key}.name"), format!("{name:?} appears twice"));
            continue;
        }
        if u.password_file.trim().is_empty() {
            v.problem(&format!("{key}.password_file"), "is required");
            continue;
        }
        let Some(text) = v.secret_file(&format!("{key}.password_file"), &u.password_file) else {
            continue;
        };
        match WebUser::new(name, &text) {
            Ok(user) => users.push(user),
            Err(e) => v.problem(
                &format!("{key}.password_file"),
                format!("{}: {e}", u.password_file),
            ),
        }
    }
    WebAuth { read, users }
}

/// A valid session: who is signed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The user name (recorded as `user:NAME`).
    pub user: String,
    /// The cookie value, to derive the CSRF token from.
    pub cookie: String,
}

/// Signs and checks session cookies and CSRF tokens with a key drawn at startup.
pub struct Sessions {
    key: hmac::Key,
    ttl_ms: i64,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("ttl_ms", &self.ttl_ms)
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// A fresh random key (from the operating system's CSPRNG via ring).
    ///
    /// # Errors
    /// When the system random source fails.
    pub fn new() -> Result<Self, ring::error::Unspecified> {
        let rng = ring::rand::SystemRandom::new();
        Ok(Sessions {
            key: hmac::Key::generate(hmac::HMAC_SHA256, &rng)?,
            ttl_ms: i64::try_from(SESSION_TTL.as_millis()).unwrap_or(i64::MAX),
        })
    }

    /// The cookie value for `user` signed in at `now_ms`:
    /// `BASE64URL(user).EXPIRY_MS.NONCE.BASE64URL(HMAC)`.
    pub fn issue(&self, user: &str, now_ms: i64) -> String {
        let mut nonce = [0u8; 12];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce);
        let body = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(user),
            now_ms.saturating_add(self.ttl_ms),
            URL_SAFE_NO_PAD.encode(nonce)
        );
        let tag = hmac::sign(&self.key, format!("session|{body}").as_bytes());
        format!("{body}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// The session of a cookie value, if it is signed by this key and not expired.
    pub fn verify(&self, cookie: &str, now_ms: i64) -> Option<Session> {
        let (body, tag) = cookie.rsplit_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        hmac::verify(&self.key, format!("session|{body}").as_bytes(), &tag).ok()?;
        let mut parts = body.split('.');
        let user = URL_SAFE_NO_PAD.decode(parts.next()?).ok()?;
        let expiry: i64 = parts.next()?.parse().ok()?;
        if now_ms >= expiry {
            return None;
        }
        Some(Session {
            user: String::from_utf8(user).ok()?,
            cookie: cookie.to_owned(),
        })
    }

    /// The CSRF token of a session: forms carry it in a hidden `csrf` field.
    pub fn csrf(&self, session: &Session) -> String {
        let tag = hmac::sign(&self.key, format!("csrf|{}", session.cookie).as_bytes());
        URL_SAFE_NO_PAD.encode(tag.as_ref())
    }

    /// Whether `given` is the CSRF token of `session` (constant time).
    pub fn check_csrf(&self, session: &Session, given: &str) -> bool {
        ct_eq(self.csrf(session).as_bytes(), given.as_bytes())
    }
}

/// Whether `a` and `b` are equal, in time independent of where they differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

/// The value of cookie `name` in a `Cookie` request header.
pub fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The token of an `Authorization: Bearer TOKEN` header (the scheme in any case, as
/// RFC 9110 allows), if there is one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Whether the `Host` header names a loopback address (`localhost`, `127.x`, `[::1]`,
/// with or without a port): the defence against DNS rebinding when a loopback listener
/// trusts whoever connects.
pub fn host_is_loopback(headers: &axum::http::HeaderMap) -> bool {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let name = host
        .rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map_or(host, |(h, _)| h);
    name == "localhost"
        || name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether a form POST comes from this site: an `Origin` header, when present (browsers
/// send one with every POST), must be `http(s)://` + the request's `Host`; a
/// `Sec-Fetch-Site` header, when present, must be `same-origin`.
pub fn same_origin(headers: &axum::http::HeaderMap) -> bool {
    let get = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    if let Some(site) = get("sec-fetch-site")
        && site != "same-origin"
        && site != "none"
    {
        return false;
    }
    match get("origin") {
        None => true,
        Some(origin) => {
            let host = get("host").unwrap_or("");
            !host.is_empty()
                && (origin == format!("http://{host}") || origin == format!("https://{host}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_round_trip_and_refuse_tampering_and_expiry() {
        let s = Sessions::new().expect("key");
        let c = s.issue("Zoë on-call", 1_000);
        let session = s.verify(&c, 2_000).expect("valid");
        assert_eq!(session.user, "Zoë on-call");
        assert!(s.verify(&c, 1_000 + s.ttl_ms).is_none(), "expired");
        let forged = c.replacen(
            &URL_SAFE_NO_PAD.encode("Zoë on-call"),
            &URL_SAFE_NO_PAD.encode("admin"),
            1,
        );
        assert!(
            s.verify(&forged, 2_000).is_none(),
            "another name breaks the signature"
        );
        let other = Sessions::new().expect("key");
        assert!(
            other.verify(&c, 2_000).is_none(),
            "another key (a restart) signs out"
        );
        let token = s.csrf(&session);
        assert!(s.check_csrf(&session, &token));
        assert!(!s.check_csrf(&session, ""));
        let second = s
            .verify(&s.issue("Zoë on-call", 1_000), 2_000)
            .expect("valid");
        assert!(
            !s.check_csrf(&second, &token),
            "the token belongs to one session"
        );
    }

    #[test]
    fn passwords_plain_and_argon2() {
        use argon2::PasswordHasher as _;
        let salt =
            argon2::password_hash::SaltString::encode_b64(b"tocsin-test-salt").expect("salt");
        let phc = argon2::Argon2::default()
            .hash_password(b"correct horse", &salt)
            .expect("hash")
            .to_string();
        let u = WebUser::new("alice", &phc).expect("argon2");
        assert!(u.verify("correct horse"));
        assert!(!u.verify("Correct horse"));
        let p = WebUser::new("bob", "s3cret").expect("plain");
        assert!(p.verify("s3cret"));
        assert!(!p.verify("s3cre"));
        assert!(WebUser::new("c", "").is_err());
        assert!(WebUser::new("c", "$argon2id$v=19$garbage").is_err());
        let bcrypt = WebUser::new(
            "c",
            "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",
        );
        assert!(bcrypt.is_err_and(|e| e.contains("argon2")));
    }

    #[test]
    fn origin_and_host_checks() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = axum::http::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, axum::http::HeaderValue::from_static(v));
            }
            m
        };
        assert!(same_origin(&h(&[("host", "127.0.0.1:7600")])));
        assert!(same_origin(&h(&[
            ("host", "127.0.0.1:7600"),
            ("origin", "http://127.0.0.1:7600")
        ])));
        assert!(!same_origin(&h(&[
            ("host", "127.0.0.1:7600"),
            ("origin", "http://evil.example")
        ])));
        assert!(!same_origin(&h(&[
            ("host", "127.0.0.1:7600"),
            ("origin", "null")
        ])));
        assert!(!same_origin(&h(&[
            ("host", "a:1"),
            ("sec-fetch-site", "cross-site")
        ])));
        assert!(host_is_loopback(&h(&[("host", "localhost:7600")])));
        assert!(host_is_loopback(&h(&[("host", "[::1]:7600")])));
        assert!(!host_is_loopback(&h(&[("host", "evil.example:7600")])));
        assert_eq!(bearer(&h(&[("authorization", "bearer abc")])), Some("abc"));
        assert_eq!(
            bearer(&h(&[("authorization", "Bearer  abc ")])),
            Some("abc")
        );
        assert_eq!(bearer(&h(&[("authorization", "Basic abc")])), None);
        let c = h(&[("cookie", "a=1; tocsin_session=abc.def; b=2")]);
        assert_eq!(cookie(&c, SESSION_COOKIE), Some("abc.def"));
    }
}
