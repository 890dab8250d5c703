//! The userlist file: who may log in through the proxy, and with what password.
//!
//! One user per line, PgBouncer's `auth_file` format: `"user" "password"`. A double quote
//! inside a value is written twice (`""`). Empty lines and lines starting with `#` or `;` are
//! ignored. The password is either plaintext or a SCRAM-SHA-256 secret as stored in
//! `pg_authid.rolpassword` (`SCRAM-SHA-256$4096:...`):
//!
//! - plaintext: clients log in with SCRAM against a secret the proxy derives at load time
//!   (with `auth_type = "md5"`: with MD5 against the password's MD5 hash), and the proxy logs
//!   in to postgres with the password (SCRAM, MD5 or cleartext, whichever the server asks
//!   for);
//! - a SCRAM secret: clients log in with SCRAM against it, and the proxy logs in to postgres
//!   with the `ClientKey` recovered from the client's proof (pass-through). That works when
//!   postgres holds the same secret (copy it from `pg_authid`), and only with SCRAM.
//!
//! MD5 hashes (`md5...`) are refused in the file. Users missing from the file may be looked up
//! on the primary with `auth_query` ([`UserEntry::from_stored`], cached in [`AuthCache`]);
//! there an MD5 hash is accepted and the client is checked with MD5.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::scram::{self, ScramSecret};

/// One user's entry.
#[derive(Clone)]
pub struct UserEntry {
    /// What clients are checked against.
    pub secret: ScramSecret,
    /// The plaintext password, when the file has it (needed for MD5 and cleartext logins to
    /// servers).
    pub password: Option<String>,
    /// An MD5 hash (`md5...`), from `auth_query` only: the client is checked with MD5
    /// against it (then `secret` is unused), and the proxy logs in to servers with it.
    pub md5: Option<String>,
}

impl std::fmt::Debug for UserEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserEntry").field("plaintext", &self.password.is_some()).finish_non_exhaustive()
    }
}

/// The parsed userlist.
#[derive(Debug, Clone, Default)]
pub struct Userlist {
    users: HashMap<String, UserEntry>,
}

impl Userlist {
    /// Reads and parses a userlist file. Errors name the file, the line and the problem.
    pub fn load(path: &Path) -> Result<Userlist, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read the userlist {}: {e}", path.display()))?;
        Userlist::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the text of a userlist. Plaintext passwords get a SCRAM secret with a random
    /// salt.
    pub fn parse(text: &str) -> Result<Userlist, String> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            let (user, rest) = quoted(line).map_err(|e| format!("line {n}: {e}"))?;
            let (password, rest) = quoted(rest.trim_start()).map_err(|e| format!("line {n}: {e}"))?;
            // PgBouncer allows more fields after the password; they are ignored there too.
            if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
                return Err(format!(
                    "line {n}: unexpected text after the password; the format is \"user\" \"password\""
                ));
            }
            if user.is_empty() {
                return Err(format!("line {n}: the user name is empty"));
            }
            let entry = if password.starts_with("SCRAM-SHA-256$") {
                let secret = ScramSecret::parse(&password).map_err(|e| format!("line {n} (user {user:?}): {e}"))?;
                UserEntry { secret, password: None, md5: None }
            } else if password.len() == 35 && password.starts_with("md5") {
                return Err(format!(
                    "line {n} (user {user:?}): MD5 hashes are not supported; put the plaintext password or the \
                     SCRAM-SHA-256 secret from pg_authid.rolpassword there (for clients that can only do MD5: the \
                     plaintext password, with auth_type = \"md5\" in [auth])"
                ));
            } else if password.is_empty() {
                return Err(format!("line {n} (user {user:?}): the password is empty"));
            } else {
                let salt = scram::random_bytes(16).map_err(|e| e.to_string())?;
                UserEntry {
                    secret: ScramSecret::from_password(&password, &salt, scram::DEFAULT_ITERATIONS),
                    password: Some(password),
                    md5: None,
                }
            };
            if users.insert(user.clone(), entry).is_some() {
                return Err(format!("line {n}: user {user:?} is listed twice"));
            }
        }
        Ok(Userlist { users })
    }

    /// A user's entry.
    pub fn get(&self, user: &str) -> Option<&UserEntry> {
        self.users.get(user)
    }

    /// How many users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// How long an `auth_query` answer is reused: a user found, and a user not found.
pub const AUTH_CACHE_FOUND: Duration = Duration::from_secs(30);
/// See [`AUTH_CACHE_FOUND`]. Errors (no primary, a failed query) are not cached at all.
pub const AUTH_CACHE_MISSING: Duration = Duration::from_secs(5);
/// Entries kept at most; beyond it the expired ones are dropped, then everything.
const AUTH_CACHE_MAX: usize = 10_000;

impl UserEntry {
    /// The entry for a password column returned by `auth_query`: a SCRAM-SHA-256 secret, an
    /// MD5 hash, or (rarely) a plaintext password. `None` for NULL or empty (no password:
    /// the user cannot log in through the proxy).
    pub fn from_stored(stored: Option<&str>) -> Result<Option<UserEntry>, String> {
        let Some(stored) = stored.filter(|s| !s.is_empty()) else { return Ok(None) };
        if stored.starts_with("SCRAM-SHA-256$") {
            let secret = ScramSecret::parse(stored)?;
            return Ok(Some(UserEntry { secret, password: None, md5: None }));
        }
        // The SCRAM secret is not used for MD5 entries; a random one keeps the type simple.
        let salt = scram::random_bytes(16).map_err(|e| e.to_string())?;
        let filler = scram::new_nonce().map_err(|e| e.to_string())?;
        if stored.len() == 35 && stored.starts_with("md5") && stored[3..].bytes().all(|b| b.is_ascii_hexdigit()) {
            let secret = ScramSecret::from_password(&filler, &salt, scram::DEFAULT_ITERATIONS);
            return Ok(Some(UserEntry { secret, password: None, md5: Some(stored.to_string()) }));
        }
        let secret = ScramSecret::from_password(stored, &salt, scram::DEFAULT_ITERATIONS);
        Ok(Some(UserEntry { secret, password: Some(stored.to_string()), md5: None }))
    }
}

/// `auth_query` answers by (database, user), each until it expires.
#[derive(Debug, Default)]
pub struct AuthCache {
    entries: Mutex<HashMap<(String, String), CachedAnswer>>,
}

/// Until when, and the answer (`None`: no such user).
type CachedAnswer = (Instant, Option<UserEntry>);

impl AuthCache {
    /// A fresh answer: `Some(None)` is "no such user".
    pub fn get(&self, database: &str, user: &str) -> Option<Option<UserEntry>> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let (until, entry) = entries.get(&(database.to_string(), user.to_string()))?;
        (Instant::now() < *until).then(|| entry.clone())
    }

    /// Keeps an answer for [`AUTH_CACHE_FOUND`] or [`AUTH_CACHE_MISSING`].
    pub fn put(&self, database: &str, user: &str, entry: Option<UserEntry>) {
        let ttl = if entry.is_some() { AUTH_CACHE_FOUND } else { AUTH_CACHE_MISSING };
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= AUTH_CACHE_MAX {
            entries.retain(|_, (until, _)| *until > now);
            if entries.len() >= AUTH_CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert((database.to_string(), user.to_string()), (now + ttl, entry));
    }
}

/// Reads one `"..."` value (with `""` for a quote) off the front of `s`.
fn quoted(s: &str) -> Result<(String, &str), String> {
    let Some(body) = s.strip_prefix('"') else {
        return Err(format!(
            "expected a double-quoted value, found {:?}; the format is \"user\" \"password\"",
            s.chars().take(20).collect::<String>()
        ));
    };
    let mut out = String::new();
    let mut chars = body.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if chars.peek().is_some_and(|(_, c)| *c == '"') {
                chars.next();
                out.push('"');
            } else {
                return Ok((out, &body[i + 1..]));
            }
        } else {
            out.push(c);
        }
    }
    Err("a value is missing its closing double quote".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plaintext_scram_comments_and_quotes() {
        let secret = ScramSecret::from_password("pencil", b"salt", 4096).to_string();
        let text = format!(
            "# comment\n; also a comment\n\n\"alice\" \"wonder\"\"land\"\n  \"bob\"   \"{secret}\" \"ignored\"\n"
        );
        let u = Userlist::parse(&text).unwrap();
        assert_eq!(u.len(), 2);
        let alice = u.get("alice").unwrap();
        assert_eq!(alice.password.as_deref(), Some("wonder\"land"));
        assert_eq!(alice.secret.iterations, 4096);
        let bob = u.get("bob").unwrap();
        assert!(bob.password.is_none());
        assert_eq!(bob.secret.to_string(), secret);
        assert!(u.get("carol").is_none());
    }

    #[test]
    fn auth_query_answers_and_the_cache() {
        let secret = ScramSecret::from_password("pencil", b"salt", 4096).to_string();
        let e = UserEntry::from_stored(Some(&secret)).unwrap().unwrap();
        assert_eq!((e.secret.to_string(), e.password.is_none(), e.md5.is_none()), (secret, true, true));
        let md5 = scram::md5_hash("bob", "pw");
        let e = UserEntry::from_stored(Some(&md5)).unwrap().unwrap();
        assert_eq!(e.md5.as_deref(), Some(md5.as_str()));
        let e = UserEntry::from_stored(Some("plain")).unwrap().unwrap();
        assert_eq!(e.password.as_deref(), Some("plain"));
        assert!(UserEntry::from_stored(None).unwrap().is_none());
        assert!(UserEntry::from_stored(Some("")).unwrap().is_none());
        assert!(UserEntry::from_stored(Some("SCRAM-SHA-256$x")).is_err());

        let cache = AuthCache::default();
        assert!(cache.get("db", "bob").is_none());
        cache.put("db", "bob", UserEntry::from_stored(Some(&md5)).unwrap());
        cache.put("db", "nobody", None);
        assert!(cache.get("db", "bob").unwrap().is_some());
        assert!(cache.get("db", "nobody").unwrap().is_none(), "a known miss");
        assert!(cache.get("other", "bob").is_none(), "per database");
    }

    #[test]
    fn bad_lines_name_the_line_and_the_problem() {
        for (text, why) in [
            ("alice password", "line 1: expected a double-quoted value"),
            ("\"alice\" \"pw", "line 1: a value is missing its closing double quote"),
            ("\n\"alice\"", "line 2: expected a double-quoted value"),
            ("\"alice\" \"pw\"x", "line 1: unexpected text after the password"),
            ("\"\" \"pw\"", "line 1: the user name is empty"),
            ("\"alice\" \"\"", "the password is empty"),
            ("\"alice\" \"md5aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"", "MD5 hashes are not supported"),
            ("\"alice\" \"SCRAM-SHA-256$x\"", "line 1 (user \"alice\"): missing"),
            ("\"a\" \"1\"\n\"a\" \"2\"", "line 2: user \"a\" is listed twice"),
        ] {
            let err = Userlist::parse(text).unwrap_err();
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }
}
