//! Server → client messages.

use bytes::{BufMut, Bytes, BytesMut};

use super::fields::{ErrorFields, Severity};
use super::read::Reader;
use super::{frame_len, split_frame, write, Direction, Frame, Limits, ProtocolError, Tag, Text};

/// The longest cancel key: protocol 3.2 (PostgreSQL 18) made the key variable-length, up to
/// 256 bytes; 3.0 keys are 4 bytes.
pub(crate) const MAX_CANCEL_KEY_LEN: usize = 256;

/// An authentication request or result ('R').
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    /// 0: authentication succeeded.
    Ok,
    /// 3: send the password in clear text.
    CleartextPassword,
    /// 5: send `md5(md5(password || user) || salt)`.
    Md5Password {
        /// The 4-byte salt.
        salt: [u8; 4],
    },
    /// 7: start GSSAPI.
    Gss,
    /// 8: GSSAPI or SSPI continuation data.
    GssContinue(Bytes),
    /// 9: start SSPI.
    Sspi,
    /// 10: start SASL with one of these mechanisms.
    Sasl {
        /// Mechanism names in the server's order of preference, e.g. `SCRAM-SHA-256`.
        mechanisms: Vec<String>,
    },
    /// 11: SASL challenge.
    SaslContinue(Bytes),
    /// 12: SASL outcome (the server's final message).
    SaslFinal(Bytes),
}

impl Authentication {
    fn code(&self) -> i32 {
        match self {
            Authentication::Ok => 0,
            Authentication::CleartextPassword => 3,
            Authentication::Md5Password { .. } => 5,
            Authentication::Gss => 7,
            Authentication::GssContinue(_) => 8,
            Authentication::Sspi => 9,
            Authentication::Sasl { .. } => 10,
            Authentication::SaslContinue(_) => 11,
            Authentication::SaslFinal(_) => 12,
        }
    }
}

/// The transaction status in ReadyForQuery: what a transaction-mode pooler looks at to
/// know when a server connection can go back to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransactionStatus {
    /// `'I'`: not in a transaction block.
    Idle,
    /// `'T'`: in a transaction block.
    InTransaction,
    /// `'E'`: in a failed transaction block (queries are rejected until it ends).
    Failed,
}

impl TransactionStatus {
    /// The status byte.
    pub fn byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InTransaction => b'T',
            TransactionStatus::Failed => b'E',
        }
    }
}

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDescription {
    /// Column name.
    pub name: Text,
    /// OID of the table it comes from, or 0.
    pub table_oid: u32,
    /// Attribute number in that table, or 0.
    pub column_id: i16,
    /// Data type OID.
    pub type_oid: u32,
    /// `pg_type.typlen` (negative for variable width).
    pub type_size: i16,
    /// `pg_attribute.atttypmod`.
    pub type_modifier: i32,
    /// Format code (0 text, 1 binary; 0 in a Describe answer, where it is not known yet).
    pub format: i16,
}

/// The body of CopyInResponse, CopyOutResponse and CopyBothResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyResponse {
    /// Overall format: 0 text, 1 binary.
    pub format: i8,
    /// One format code per column.
    pub column_formats: Vec<i16>,
}

/// A server message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    /// 'R'.
    Authentication(Authentication),
    /// 'K': what a client needs to cancel a query of this backend.
    BackendKeyData {
        /// Backend process id.
        pid: i32,
        /// Secret key: 4 bytes in protocol 3.0, up to 256 in 3.2.
        secret_key: Bytes,
    },
    /// '2'.
    BindComplete,
    /// '3'.
    CloseComplete,
    /// 'C': a command finished; the tag is e.g. `SELECT 1` or `INSERT 0 3`.
    CommandComplete {
        /// The command tag.
        tag: Text,
    },
    /// 'd'.
    CopyData(Bytes),
    /// 'c'.
    CopyDone,
    /// 'G'.
    CopyInResponse(CopyResponse),
    /// 'H'.
    CopyOutResponse(CopyResponse),
    /// 'W': replication streams.
    CopyBothResponse(CopyResponse),
    /// 'D': one row; `None` is SQL NULL.
    DataRow(Vec<Option<Bytes>>),
    /// 'I': the query string was empty.
    EmptyQueryResponse,
    /// 'E'.
    ErrorResponse(ErrorFields),
    /// 'V': the result of a FunctionCall; `None` is SQL NULL.
    FunctionCallResponse(Option<Bytes>),
    /// 'v': the server does not support the requested minor version or some `_pq_.` options.
    NegotiateProtocolVersion {
        /// Newest minor version of the requested major version the server supports.
        newest_minor: i32,
        /// Protocol options the server did not recognise.
        unrecognized_options: Vec<Text>,
    },
    /// 'n': the statement or portal returns no rows.
    NoData,
    /// 'N'.
    NoticeResponse(ErrorFields),
    /// 'A': LISTEN/NOTIFY.
    NotificationResponse {
        /// Pid of the notifying backend.
        pid: i32,
        /// Channel name.
        channel: Text,
        /// Payload.
        payload: Text,
    },
    /// 't': parameter type OIDs of a prepared statement.
    ParameterDescription(Vec<u32>),
    /// 'S': a run-time parameter's value (sent at startup and when a GUC_REPORT setting
    /// changes).
    ParameterStatus {
        /// Parameter name.
        name: Text,
        /// Its value.
        value: Text,
    },
    /// '1'.
    ParseComplete,
    /// 's': Execute stopped at its row limit.
    PortalSuspended,
    /// 'Z': ready for a new query, with the transaction status.
    ReadyForQuery(TransactionStatus),
    /// 'T': the columns of the rows to come.
    RowDescription(Vec<FieldDescription>),
}

/// The message name of a backend tag, for errors.
fn name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'R' => "Authentication message",
        b'K' => "BackendKeyData message",
        b'2' => "BindComplete message",
        b'3' => "CloseComplete message",
        b'C' => "CommandComplete message",
        b'd' => "CopyData message",
        b'c' => "CopyDone message",
        b'G' => "CopyInResponse message",
        b'H' => "CopyOutResponse message",
        b'W' => "CopyBothResponse message",
        b'D' => "DataRow message",
        b'I' => "EmptyQueryResponse message",
        b'E' => "ErrorResponse message",
        b'V' => "FunctionCallResponse message",
        b'v' => "NegotiateProtocolVersion message",
        b'n' => "NoData message",
        b'N' => "NoticeResponse message",
        b'A' => "NotificationResponse message",
        b't' => "ParameterDescription message",
        b'S' => "ParameterStatus message",
        b'1' => "ParseComplete message",
        b's' => "PortalSuspended message",
        b'Z' => "ReadyForQuery message",
        b'T' => "RowDescription message",
        _ => return None,
    })
}

/// Decodes server messages. Holds only the limits.
#[derive(Debug, Clone, Default)]
pub struct BackendDecoder {
    /// Size limits ([`Limits::max_message_len`] applies to every server message).
    pub limits: Limits,
}

impl BackendDecoder {
    /// A decoder with these limits.
    pub fn new(limits: Limits) -> BackendDecoder {
        BackendDecoder { limits }
    }

    /// Takes one message off `buf`: `Ok(None)` (nothing consumed) until it is complete.
    /// An unknown type byte fails as soon as it arrives.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<BackendMessage>, ProtocolError> {
        let Some(&tag) = buf.first() else { return Ok(None) };
        let Some(message) = name(tag) else {
            return Err(ProtocolError::UnknownMessage { direction: Direction::Backend, tag: Tag(tag) });
        };
        match split_frame(buf, message, self.limits.max_message_len)? {
            Some(frame) => BackendMessage::parse(&frame).map(Some),
            None => Ok(None),
        }
    }

    /// Takes one raw message off `buf`, checking only its length.
    pub fn decode_frame(&self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        let Some(&tag) = buf.first() else { return Ok(None) };
        split_frame(buf, name(tag).unwrap_or("backend message"), self.limits.max_message_len)
    }

    /// The size of the whole message at the start of `buf` once all of it is there, checking
    /// only its length, as [`BackendDecoder::decode_frame`] does without taking it off: for
    /// messages handled in place.
    pub fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
        let Some(&tag) = buf.first() else { return Ok(None) };
        frame_len(buf, name(tag).unwrap_or("backend message"), self.limits.max_message_len)
    }
}

fn read_copy_response(r: &mut Reader) -> Result<CopyResponse, ProtocolError> {
    let format = r.u8("overall format")? as i8;
    let n = r.count("column format", 2)?;
    let mut column_formats = Vec::with_capacity(n);
    for i in 0..n {
        column_formats.push(r.i16(format_args!("column format {}", i + 1))?);
    }
    Ok(CopyResponse { format, column_formats })
}

fn read_fields(r: &mut Reader) -> Result<ErrorFields, ProtocolError> {
    let mut fields = ErrorFields::default();
    loop {
        if r.remaining() == 0 {
            return Err(r.err("missing the NUL byte that ends the field list"));
        }
        let code = r.u8("field type")?;
        if code == 0 {
            return Ok(fields);
        }
        let value = r.cstr(format_args!("field {} value", Tag(code)))?;
        fields.push(code, value);
    }
}

fn read_authentication(r: &mut Reader) -> Result<Authentication, ProtocolError> {
    let code = r.i32("authentication request type")?;
    Ok(match code {
        0 => Authentication::Ok,
        3 => Authentication::CleartextPassword,
        5 => {
            let salt = r.bytes(4, "MD5 salt")?;
            let mut s = [0u8; 4];
            s.copy_from_slice(&salt);
            Authentication::Md5Password { salt: s }
        }
        7 => Authentication::Gss,
        8 => Authentication::GssContinue(r.rest()),
        9 => Authentication::Sspi,
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                if r.remaining() == 0 {
                    return Err(r.err("SASL mechanism list is missing its terminating empty string"));
                }
                let m = r.utf8("SASL mechanism name")?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m);
            }
            Authentication::Sasl { mechanisms }
        }
        11 => Authentication::SaslContinue(r.rest()),
        12 => Authentication::SaslFinal(r.rest()),
        other => return Err(r.err(format!("unsupported authentication request type {other}"))),
    })
}

impl BackendMessage {
    /// An ErrorResponse (severities ERROR, FATAL, PANIC) or NoticeResponse (the others)
    /// with severity, SQLSTATE and message: what a pooler sends for its own errors.
    /// `sqlstate` should be one of [`super::sqlstate`]; NUL bytes in either text are dropped.
    pub fn error(severity: Severity, sqlstate: &str, message: &str) -> BackendMessage {
        let fields = ErrorFields::new(severity, sqlstate, message);
        if severity.is_error() {
            BackendMessage::ErrorResponse(fields)
        } else {
            BackendMessage::NoticeResponse(fields)
        }
    }

    /// Parses a whole frame (from [`BackendDecoder::decode_frame`]).
    pub fn parse(frame: &Frame) -> Result<BackendMessage, ProtocolError> {
        let tag = frame.tag();
        let Some(message) = name(tag) else {
            return Err(ProtocolError::UnknownMessage { direction: Direction::Backend, tag: Tag(tag) });
        };
        let mut r = Reader::new(message, frame.body());
        let msg = match tag {
            b'R' => BackendMessage::Authentication(read_authentication(&mut r)?),
            b'K' => {
                let pid = r.i32("process id")?;
                let secret_key = r.rest();
                if secret_key.len() < 4 || secret_key.len() > MAX_CANCEL_KEY_LEN {
                    return Err(
                        r.err(format!("secret key of {} bytes (must be 4 to {MAX_CANCEL_KEY_LEN})", secret_key.len()))
                    );
                }
                BackendMessage::BackendKeyData { pid, secret_key }
            }
            b'2' => BackendMessage::BindComplete,
            b'3' => BackendMessage::CloseComplete,
            b'C' => BackendMessage::CommandComplete { tag: r.cstr("command tag")? },
            b'd' => BackendMessage::CopyData(r.rest()),
            b'c' => BackendMessage::CopyDone,
            b'G' => BackendMessage::CopyInResponse(read_copy_response(&mut r)?),
            b'H' => BackendMessage::CopyOutResponse(read_copy_response(&mut r)?),
            b'W' => BackendMessage::CopyBothResponse(read_copy_response(&mut r)?),
            b'D' => {
                let n = r.count("column", 4)?;
                let mut values = Vec::with_capacity(n);
                for i in 0..n {
                    values.push(r.nullable(format_args!("column {}", i + 1))?);
                }
                BackendMessage::DataRow(values)
            }
            b'I' => BackendMessage::EmptyQueryResponse,
            b'E' => BackendMessage::ErrorResponse(read_fields(&mut r)?),
            b'V' => BackendMessage::FunctionCallResponse(r.nullable("result")?),
            b'v' => {
                let newest_minor = r.i32("newest minor version")?;
                let n = r.i32("option count")?;
                let remaining = r.remaining();
                let Ok(n) = usize::try_from(n) else {
                    return Err(r.err(format!("negative option count {n}")));
                };
                // Each option is at least its NUL terminator.
                if n > remaining {
                    return Err(r.err(format!("declared {n} options but only {remaining} bytes remain")));
                }
                let mut unrecognized_options = Vec::with_capacity(n);
                for i in 0..n {
                    unrecognized_options.push(r.cstr(format_args!("option {}", i + 1))?);
                }
                BackendMessage::NegotiateProtocolVersion { newest_minor, unrecognized_options }
            }
            b'n' => BackendMessage::NoData,
            b'N' => BackendMessage::NoticeResponse(read_fields(&mut r)?),
            b'A' => {
                let pid = r.i32("process id")?;
                let channel = r.cstr("channel name")?;
                BackendMessage::NotificationResponse { pid, channel, payload: r.cstr("payload")? }
            }
            b't' => {
                let n = r.count("parameter type", 4)?;
                let mut types = Vec::with_capacity(n);
                for i in 0..n {
                    types.push(r.u32(format_args!("parameter type {}", i + 1))?);
                }
                BackendMessage::ParameterDescription(types)
            }
            b'S' => {
                let name = r.cstr("parameter name")?;
                BackendMessage::ParameterStatus { name, value: r.cstr("parameter value")? }
            }
            b'1' => BackendMessage::ParseComplete,
            b's' => BackendMessage::PortalSuspended,
            b'Z' => BackendMessage::ReadyForQuery(match r.u8("transaction status")? {
                b'I' => TransactionStatus::Idle,
                b'T' => TransactionStatus::InTransaction,
                b'E' => TransactionStatus::Failed,
                other => {
                    return Err(r.err(format!("invalid transaction status {} (expected 'I', 'T' or 'E')", Tag(other))))
                }
            }),
            b'T' => {
                // Name (at least its NUL) + 18 bytes of fixed fields.
                let n = r.count("field", 19)?;
                let mut fields = Vec::with_capacity(n);
                for i in 0..n {
                    let i = i + 1;
                    fields.push(FieldDescription {
                        name: r.cstr(format_args!("field {i} name"))?,
                        table_oid: r.u32(format_args!("field {i} table OID"))?,
                        column_id: r.i16(format_args!("field {i} column number"))?,
                        type_oid: r.u32(format_args!("field {i} type OID"))?,
                        type_size: r.i16(format_args!("field {i} type size"))?,
                        type_modifier: r.i32(format_args!("field {i} type modifier"))?,
                        format: r.i16(format_args!("field {i} format code"))?,
                    });
                }
                BackendMessage::RowDescription(fields)
            }
            _ => return Err(ProtocolError::UnknownMessage { direction: Direction::Backend, tag: Tag(tag) }),
        };
        r.finish()?;
        Ok(msg)
    }

    /// The message type byte.
    pub fn tag(&self) -> u8 {
        match self {
            BackendMessage::Authentication(_) => b'R',
            BackendMessage::BackendKeyData { .. } => b'K',
            BackendMessage::BindComplete => b'2',
            BackendMessage::CloseComplete => b'3',
            BackendMessage::CommandComplete { .. } => b'C',
            BackendMessage::CopyData(_) => b'd',
            BackendMessage::CopyDone => b'c',
            BackendMessage::CopyInResponse(_) => b'G',
            BackendMessage::CopyOutResponse(_) => b'H',
            BackendMessage::CopyBothResponse(_) => b'W',
            BackendMessage::DataRow(_) => b'D',
            BackendMessage::EmptyQueryResponse => b'I',
            BackendMessage::ErrorResponse(_) => b'E',
            BackendMessage::FunctionCallResponse(_) => b'V',
            BackendMessage::NegotiateProtocolVersion { .. } => b'v',
            BackendMessage::NoData => b'n',
            BackendMessage::NoticeResponse(_) => b'N',
            BackendMessage::NotificationResponse { .. } => b'A',
            BackendMessage::ParameterDescription(_) => b't',
            BackendMessage::ParameterStatus { .. } => b'S',
            BackendMessage::ParseComplete => b'1',
            BackendMessage::PortalSuspended => b's',
            BackendMessage::ReadyForQuery(_) => b'Z',
            BackendMessage::RowDescription(_) => b'T',
        }
    }

    /// Appends the message to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        write::message(buf, self.tag(), |buf| match self {
            BackendMessage::Authentication(a) => {
                buf.put_i32(a.code());
                match a {
                    Authentication::Md5Password { salt } => buf.put_slice(salt),
                    Authentication::GssContinue(data)
                    | Authentication::SaslContinue(data)
                    | Authentication::SaslFinal(data) => buf.put_slice(data),
                    Authentication::Sasl { mechanisms } => {
                        // An empty name would end the list early; it cannot be carried.
                        mechanisms.iter().filter(|m| !m.is_empty()).for_each(|m| write::str_cstr(buf, m));
                        buf.put_u8(0);
                    }
                    Authentication::Ok
                    | Authentication::CleartextPassword
                    | Authentication::Gss
                    | Authentication::Sspi => {}
                }
            }
            BackendMessage::BackendKeyData { pid, secret_key } => {
                buf.put_i32(*pid);
                buf.put_slice(secret_key);
            }
            BackendMessage::BindComplete
            | BackendMessage::CloseComplete
            | BackendMessage::CopyDone
            | BackendMessage::EmptyQueryResponse
            | BackendMessage::NoData
            | BackendMessage::ParseComplete
            | BackendMessage::PortalSuspended => {}
            BackendMessage::CommandComplete { tag } => write::cstr(buf, tag.as_bytes()),
            BackendMessage::CopyData(data) => buf.put_slice(data),
            BackendMessage::CopyInResponse(c)
            | BackendMessage::CopyOutResponse(c)
            | BackendMessage::CopyBothResponse(c) => {
                buf.put_i8(c.format);
                let n = write::count16(buf, c.column_formats.len());
                c.column_formats.iter().take(n).for_each(|&f| buf.put_i16(f));
            }
            BackendMessage::DataRow(values) => {
                let n = write::count16(buf, values.len());
                values.iter().take(n).for_each(|v| write::nullable(buf, v.as_deref()));
            }
            BackendMessage::ErrorResponse(fields) | BackendMessage::NoticeResponse(fields) => fields.encode(buf),
            BackendMessage::FunctionCallResponse(value) => write::nullable(buf, value.as_deref()),
            BackendMessage::NegotiateProtocolVersion { newest_minor, unrecognized_options } => {
                buf.put_i32(*newest_minor);
                buf.put_i32(i32::try_from(unrecognized_options.len()).unwrap_or(i32::MAX));
                unrecognized_options.iter().for_each(|o| write::cstr(buf, o.as_bytes()));
            }
            BackendMessage::NotificationResponse { pid, channel, payload } => {
                buf.put_i32(*pid);
                write::cstr(buf, channel.as_bytes());
                write::cstr(buf, payload.as_bytes());
            }
            BackendMessage::ParameterDescription(types) => {
                let n = write::count16(buf, types.len());
                types.iter().take(n).for_each(|&t| buf.put_u32(t));
            }
            BackendMessage::ParameterStatus { name, value } => {
                write::cstr(buf, name.as_bytes());
                write::cstr(buf, value.as_bytes());
            }
            BackendMessage::ReadyForQuery(status) => buf.put_u8(status.byte()),
            BackendMessage::RowDescription(fields) => {
                let n = write::count16(buf, fields.len());
                for f in fields.iter().take(n) {
                    write::cstr(buf, f.name.as_bytes());
                    buf.put_u32(f.table_oid);
                    buf.put_i16(f.column_id);
                    buf.put_u32(f.type_oid);
                    buf.put_i16(f.type_size);
                    buf.put_i32(f.type_modifier);
                    buf.put_i16(f.format);
                }
            }
        });
    }
}
