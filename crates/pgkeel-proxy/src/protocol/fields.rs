//! The field list of ErrorResponse and NoticeResponse, severities, and the SQLSTATE codes a
//! proxy reports itself.

use bytes::{BufMut, BytesMut};

use super::{write, Text};

/// Field type bytes of ErrorResponse / NoticeResponse (PostgreSQL's "Error and Notice
/// Message Fields").
pub mod field {
    /// Severity, possibly localized: `ERROR`, `FATAL`, `PANIC`, `WARNING`, `NOTICE`,
    /// `DEBUG`, `INFO`, `LOG`.
    pub const SEVERITY: u8 = b'S';
    /// Severity, never localized (PostgreSQL 9.6 and later).
    pub const SEVERITY_NONLOCALIZED: u8 = b'V';
    /// SQLSTATE code.
    pub const CODE: u8 = b'C';
    /// Primary message.
    pub const MESSAGE: u8 = b'M';
    /// Detail.
    pub const DETAIL: u8 = b'D';
    /// Hint.
    pub const HINT: u8 = b'H';
    /// Cursor position in the query string (1-based, in characters).
    pub const POSITION: u8 = b'P';
    /// Position in an internally generated query.
    pub const INTERNAL_POSITION: u8 = b'p';
    /// The internally generated query.
    pub const INTERNAL_QUERY: u8 = b'q';
    /// Context (call stack).
    pub const WHERE: u8 = b'W';
    /// Schema name.
    pub const SCHEMA: u8 = b's';
    /// Table name.
    pub const TABLE: u8 = b't';
    /// Column name.
    pub const COLUMN: u8 = b'c';
    /// Data type name.
    pub const DATA_TYPE: u8 = b'd';
    /// Constraint name.
    pub const CONSTRAINT: u8 = b'n';
    /// Source file of the server.
    pub const FILE: u8 = b'F';
    /// Source line.
    pub const LINE: u8 = b'L';
    /// Source routine.
    pub const ROUTINE: u8 = b'R';
}

/// SQLSTATE codes the proxy uses for errors it reports itself.
pub mod sqlstate {
    /// 08P01 protocol_violation.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// 08006 connection_failure.
    pub const CONNECTION_FAILURE: &str = "08006";
    /// 08001 sqlclient_unable_to_establish_sqlconnection.
    pub const UNABLE_TO_CONNECT: &str = "08001";
    /// 0A000 feature_not_supported.
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    /// 22023 invalid_parameter_value.
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    /// 26000 invalid_sql_statement_name (an unknown prepared statement).
    pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
    /// 42P05 duplicate_prepared_statement.
    pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
    /// 25006 read_only_sql_transaction.
    pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
    /// 28000 invalid_authorization_specification.
    pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
    /// 28P01 invalid_password.
    pub const INVALID_PASSWORD: &str = "28P01";
    /// 3D000 invalid_catalog_name (unknown database).
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    /// 53300 too_many_connections.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// 55000 object_not_in_prerequisite_state (postgres's for a database that accepts no
    /// connections).
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
    /// 55006 object_in_use.
    pub const OBJECT_IN_USE: &str = "55006";
    /// 57014 query_canceled.
    pub const QUERY_CANCELED: &str = "57014";
    /// 57P01 admin_shutdown.
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// 57P05 idle_session_timeout.
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    /// 57P03 cannot_connect_now.
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// 58000 system_error.
    pub const SYSTEM_ERROR: &str = "58000";
    /// XX000 internal_error.
    pub const INTERNAL_ERROR: &str = "XX000";
}

/// Severity of an ErrorResponse or NoticeResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Severity {
    /// The statement failed.
    Error,
    /// The session ends.
    Fatal,
    /// The server restarts all sessions.
    Panic,
    /// Notice: warning.
    Warning,
    /// Notice.
    Notice,
    /// Notice: debug output.
    Debug,
    /// Notice: information.
    Info,
    /// Notice: log output.
    Log,
}

impl Severity {
    /// The nonlocalized name, e.g. `FATAL`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Panic => "PANIC",
            Severity::Warning => "WARNING",
            Severity::Notice => "NOTICE",
            Severity::Debug => "DEBUG",
            Severity::Info => "INFO",
            Severity::Log => "LOG",
        }
    }

    /// Whether this severity belongs in an ErrorResponse (rather than a NoticeResponse).
    pub fn is_error(self) -> bool {
        matches!(self, Severity::Error | Severity::Fatal | Severity::Panic)
    }
}

/// The SQLSTATE of the ErrorResponse at the front of `bytes`, when the whole message is
/// there, without decoding the rest: a look at what a pooled connection's server sent while it
/// sat idle. `None` for anything else.
pub fn error_code(bytes: &[u8]) -> Option<[u8; 5]> {
    let (&tag, rest) = bytes.split_first()?;
    if tag != b'E' {
        return None;
    }
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let mut fields = rest.get(4..len)?;
    while let Some((&code, after)) = fields.split_first() {
        if code == 0 {
            break;
        }
        let end = after.iter().position(|&b| b == 0)?;
        if code == b'C' {
            return after[..end].try_into().ok();
        }
        fields = &after[end + 1..];
    }
    None
}

/// The fields of an ErrorResponse or NoticeResponse, in the order received. Unknown field
/// types are kept (the protocol says to ignore them; a proxy forwards them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    fields: Vec<(u8, Text)>,
}

impl ErrorFields {
    /// Severity (localized and not), SQLSTATE and message: the fields every server error
    /// has. NUL bytes in `sqlstate` or `message` are dropped.
    pub fn new(severity: Severity, sqlstate: &str, message: &str) -> ErrorFields {
        let mut f = ErrorFields::default();
        f.push(field::SEVERITY, Text::from_static(severity.as_str()));
        f.push(field::SEVERITY_NONLOCALIZED, Text::from_static(severity.as_str()));
        f.push(field::CODE, Text::lossy(sqlstate));
        f.push(field::MESSAGE, Text::lossy(message));
        f
    }

    /// Adds a field (builder style), e.g. `.with(field::HINT, Text::lossy("..."))`.
    pub fn with(mut self, code: u8, value: Text) -> ErrorFields {
        self.push(code, value);
        self
    }

    /// Appends a field. A field type of 0 would end the list on the wire, so it is ignored.
    pub fn push(&mut self, code: u8, value: Text) {
        if code != 0 {
            self.fields.push((code, value));
        }
    }

    /// The first field of this type.
    pub fn get(&self, code: u8) -> Option<&Text> {
        self.fields.iter().find(|(c, _)| *c == code).map(|(_, v)| v)
    }

    /// All fields, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &Text)> {
        self.fields.iter().map(|(c, v)| (*c, v))
    }

    /// The nonlocalized severity when present, else the localized one.
    pub fn severity(&self) -> Option<&Text> {
        self.get(field::SEVERITY_NONLOCALIZED).or_else(|| self.get(field::SEVERITY))
    }

    /// The SQLSTATE code.
    pub fn code(&self) -> Option<&Text> {
        self.get(field::CODE)
    }

    /// The primary message.
    pub fn message(&self) -> Option<&Text> {
        self.get(field::MESSAGE)
    }

    /// The detail.
    pub fn detail(&self) -> Option<&Text> {
        self.get(field::DETAIL)
    }

    /// The hint.
    pub fn hint(&self) -> Option<&Text> {
        self.get(field::HINT)
    }

    pub(crate) fn encode(&self, buf: &mut BytesMut) {
        for (code, value) in &self.fields {
            buf.put_u8(*code);
            write::cstr(buf, value.as_bytes());
        }
        buf.put_u8(0);
    }
}
