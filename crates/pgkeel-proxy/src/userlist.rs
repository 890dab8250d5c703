//! The userlist file: who may log in through the proxy, and with what password.
//!
//! One user per line, PgBouncer's `auth_file` format: `"user" "password"`. A double quote
//! inside a value is written twice (`""`). Empty lines and lines starting with `#` or `;` are
//! ignored. The password is either plaintext or a SCRAM-SHA-256 secret as stored in
//! `pg_authid.rolpassword` (`SCRAM-SHA-256$4096:...`):
//!
//! - plaintext: clients log in with SCRAM against a secret the proxy derives at load time,
//!   and the proxy logs in to postgres with the password (SCRAM, MD5 or cleartext, whichever
//!   the server asks for);
//! - a SCRAM secret: clients log in with SCRAM against it, and the proxy logs in to postgres
//!   with the `ClientKey` recovered from the client's proof (pass-through). That works when
//!   postgres holds the same secret (copy it from `pg_authid`), and only with SCRAM.
//!
//! MD5 hashes (`md5...`) are refused: the proxy authenticates clients with SCRAM only.

use std::collections::HashMap;
use std::path::Path;

use crate::scram::{self, ScramSecret};

/// One user's entry.
#[derive(Clone)]
pub struct UserEntry {
    /// What clients are checked against.
    pub secret: ScramSecret,
    /// The plaintext password, when the file has it (needed for MD5 and cleartext logins to
    /// servers).
    pub password: Option<String>,
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
                UserEntry { secret, password: None }
            } else if password.len() == 35 && password.starts_with("md5") {
                return Err(format!(
                    "line {n} (user {user:?}): MD5 hashes are not supported; put the plaintext password or the \
                     SCRAM-SHA-256 secret from pg_authid.rolpassword there"
                ));
            } else if password.is_empty() {
                return Err(format!("line {n} (user {user:?}): the password is empty"));
            } else {
                let salt = scram::random_bytes(16).map_err(|e| e.to_string())?;
                UserEntry {
                    secret: ScramSecret::from_password(&password, &salt, scram::DEFAULT_ITERATIONS),
                    password: Some(password),
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
