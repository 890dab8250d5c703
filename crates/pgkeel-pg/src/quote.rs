//! Quoting for the four languages this crate writes: postgresql.conf values, libpq
//! connection strings, SQL identifiers/literals, and pg_hba.conf tokens.
//!
//! Utility statements such as `CREATE ROLE ... PASSWORD` cannot take bind parameters, so the
//! SQL helpers must be exact; they mirror libpq's `PQescapeIdentifier`/`PQescapeLiteral`.

use crate::PgError;

/// Quotes a value for postgresql.conf: single quotes, `'` doubled, backslash escaped
/// (the conf lexer treats `\` as an escape character), and newlines written as `\n`
/// (a quoted string cannot span lines).
pub fn conf_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Quotes a value for a libpq keyword/value connection string when needed: empty values and
/// values with whitespace, `'` or `\` are single-quoted with `\'` and `\\` escapes.
pub fn libpq_value(v: &str) -> String {
    let needs_quotes = v.is_empty() || v.chars().any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if !needs_quotes {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Quotes a SQL identifier (`"name"`, embedded `"` doubled).
pub(crate) fn sql_ident(v: &str) -> Result<String, PgError> {
    if v.is_empty() || v.contains('\0') {
        return Err(PgError::InvalidInput {
            what: format!("SQL identifier {v:?}: must be non-empty without NUL bytes"),
        });
    }
    Ok(format!("\"{}\"", v.replace('"', "\"\"")))
}

/// Quotes a SQL string literal. Like `PQescapeLiteral`, a value containing a backslash is
/// written as an `E'...'` literal with backslashes doubled, so the result means the same
/// whatever `standard_conforming_strings` is.
pub(crate) fn sql_literal(v: &str) -> Result<String, PgError> {
    if v.contains('\0') {
        return Err(PgError::InvalidInput { what: "SQL string: contains a NUL byte".into() });
    }
    let body = v.replace('\'', "''");
    Ok(if v.contains('\\') { format!("E'{}'", body.replace('\\', "\\\\")) } else { format!("'{body}'") })
}

/// Quotes a user or database name for pg_hba.conf. Quoting keeps names like `all` or
/// `replication` from being read as keywords. pg_hba.conf has no escape for `"`, so such
/// names are refused.
pub(crate) fn hba_token(v: &str) -> Result<String, PgError> {
    if v.is_empty() || v.chars().any(|c| c == '"' || c.is_control()) {
        return Err(PgError::InvalidInput {
            what: format!(
                "role name {v:?} for pg_hba.conf: must be non-empty, without double quotes or control characters"
            ),
        });
    }
    Ok(format!("\"{v}\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_quoting() {
        assert_eq!(conf_value("on"), "'on'");
        assert_eq!(conf_value(""), "''");
        assert_eq!(conf_value("it's"), "'it''s'");
        assert_eq!(conf_value("a\\b"), "'a\\\\b'");
        assert_eq!(conf_value("l1\nl2"), "'l1\\nl2'");
    }

    #[test]
    fn libpq_quoting() {
        assert_eq!(libpq_value("10.0.0.1"), "10.0.0.1");
        assert_eq!(libpq_value(""), "''");
        assert_eq!(libpq_value("a b"), "'a b'");
        assert_eq!(libpq_value("it's"), "'it\\'s'");
        assert_eq!(libpq_value("a\\b"), "'a\\\\b'");
        assert_eq!(libpq_value("p=w"), "p=w");
    }

    #[test]
    fn sql_quoting() {
        assert_eq!(sql_ident("repl").unwrap(), "\"repl\"");
        assert_eq!(sql_ident("we\"ird").unwrap(), "\"we\"\"ird\"");
        assert!(sql_ident("").is_err());
        assert!(sql_ident("a\0b").is_err());
        assert_eq!(sql_literal("pw").unwrap(), "'pw'");
        assert_eq!(sql_literal("it's").unwrap(), "'it''s'");
        assert_eq!(sql_literal("a\\'b").unwrap(), "E'a\\\\''b'");
        assert!(sql_literal("a\0").is_err());
    }

    #[test]
    fn hba_quoting() {
        assert_eq!(hba_token("all").unwrap(), "\"all\"");
        assert!(hba_token("a\"b").is_err());
        assert!(hba_token("").is_err());
        assert!(hba_token("a\nb").is_err());
    }
}
