//! Client → server messages after the startup packet.

use bytes::{BufMut, Bytes, BytesMut};

use super::read::Reader;
use super::{frame_len, split_frame, write, Direction, Frame, Limits, ProtocolError, Tag, Text};

/// What a 'p' message means, which depends on the authentication request the server sent
/// last: the tag is shared by PasswordMessage, SASLInitialResponse, SASLResponse and
/// GSSResponse. The caller tracks it ([`AuthExpect::after`]) and passes it to the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AuthExpect {
    /// No authentication exchange in progress: a 'p' message is a protocol violation.
    #[default]
    None,
    /// After AuthenticationCleartextPassword or AuthenticationMD5Password: PasswordMessage.
    Password,
    /// After AuthenticationSASL: SASLInitialResponse.
    SaslInitial,
    /// After AuthenticationSASLContinue: SASLResponse.
    SaslContinue,
    /// After AuthenticationGSS, AuthenticationGSSContinue or AuthenticationSSPI: GSSResponse.
    Gss,
}

impl AuthExpect {
    /// What the client's next 'p' message is, after the server sent `request`.
    pub fn after(request: &super::Authentication) -> AuthExpect {
        use super::Authentication as A;
        match request {
            A::Ok | A::SaslFinal(_) => AuthExpect::None,
            A::CleartextPassword | A::Md5Password { .. } => AuthExpect::Password,
            A::Gss | A::GssContinue(_) | A::Sspi => AuthExpect::Gss,
            A::Sasl { .. } => AuthExpect::SaslInitial,
            A::SaslContinue(_) => AuthExpect::SaslContinue,
        }
    }

    fn message_name(self) -> &'static str {
        match self {
            AuthExpect::None => "PasswordMessage",
            AuthExpect::Password => "PasswordMessage",
            AuthExpect::SaslInitial => "SASLInitialResponse message",
            AuthExpect::SaslContinue => "SASLResponse message",
            AuthExpect::Gss => "GSSResponse message",
        }
    }
}

/// Whether Describe or Close is about a prepared statement or a portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// `'S'`: a prepared statement.
    Statement,
    /// `'P'`: a portal.
    Portal,
}

impl Target {
    fn byte(self) -> u8 {
        match self {
            Target::Statement => b'S',
            Target::Portal => b'P',
        }
    }

    fn read(r: &mut Reader) -> Result<Target, ProtocolError> {
        match r.u8("target type")? {
            b'S' => Ok(Target::Statement),
            b'P' => Ok(Target::Portal),
            other => Err(r.err(format!("invalid target type {} (expected 'S' or 'P')", Tag(other)))),
        }
    }
}

/// Parse ('P'): prepare a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse {
    /// Statement name; empty for the unnamed statement.
    pub name: Text,
    /// The query text.
    pub query: Text,
    /// Parameter type OIDs the client specifies (0 = unspecified); may be fewer than the
    /// query's parameters.
    pub param_types: Vec<u32>,
}

/// Bind ('B'): create a portal from a prepared statement and parameter values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Portal name; empty for the unnamed portal.
    pub portal: Text,
    /// Statement name; empty for the unnamed statement.
    pub statement: Text,
    /// Parameter format codes (0 text, 1 binary): none (all text), one (for all), or one
    /// per parameter.
    pub param_formats: Vec<i16>,
    /// Parameter values; `None` is SQL NULL.
    pub params: Vec<Option<Bytes>>,
    /// Result column format codes, with the same none/one/each rule.
    pub result_formats: Vec<i16>,
}

/// FunctionCall ('F'): the legacy fast-path function call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionCall {
    /// The function's OID.
    pub function: u32,
    /// Argument format codes (none/one/each).
    pub arg_formats: Vec<i16>,
    /// Argument values; `None` is SQL NULL.
    pub args: Vec<Option<Bytes>>,
    /// Result format code.
    pub result_format: i16,
}

/// A client message after startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage {
    /// 'B'.
    Bind(Bind),
    /// 'C': close a prepared statement or portal.
    Close {
        /// Statement or portal.
        target: Target,
        /// Its name (empty: the unnamed one).
        name: Text,
    },
    /// 'd': COPY data.
    CopyData(Bytes),
    /// 'c': end of COPY FROM STDIN data.
    CopyDone,
    /// 'f': abort COPY FROM STDIN.
    CopyFail {
        /// The reason, reported in the server's error.
        message: Text,
    },
    /// 'D': describe a prepared statement or portal.
    Describe {
        /// Statement or portal.
        target: Target,
        /// Its name (empty: the unnamed one).
        name: Text,
    },
    /// 'E': run a portal.
    Execute {
        /// Portal name (empty: the unnamed one).
        portal: Text,
        /// Row limit; 0 means no limit.
        max_rows: i32,
    },
    /// 'H': ask the server to flush its output.
    Flush,
    /// 'F'.
    FunctionCall(FunctionCall),
    /// 'P'.
    Parse(Parse),
    /// 'p' after a cleartext or MD5 password request: the password (or `md5…` hash).
    Password(Text),
    /// 'p' after AuthenticationSASL.
    SaslInitialResponse {
        /// The chosen mechanism, e.g. `SCRAM-SHA-256`.
        mechanism: String,
        /// The initial client response; `None` when the client sent length -1.
        data: Option<Bytes>,
    },
    /// 'p' after AuthenticationSASLContinue.
    SaslResponse(Bytes),
    /// 'p' during GSSAPI or SSPI authentication.
    GssResponse(Bytes),
    /// 'Q': simple query.
    Query(Text),
    /// 'S': end of an extended-protocol batch.
    Sync,
    /// 'X': the client is closing the connection.
    Terminate,
}

/// The message name of a frontend tag, for errors.
fn name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'B' => "Bind message",
        b'C' => "Close message",
        b'd' => "CopyData message",
        b'c' => "CopyDone message",
        b'f' => "CopyFail message",
        b'D' => "Describe message",
        b'E' => "Execute message",
        b'H' => "Flush message",
        b'F' => "FunctionCall message",
        b'P' => "Parse message",
        b'p' => "PasswordMessage",
        b'Q' => "Query message",
        b'S' => "Sync message",
        b'X' => "Terminate message",
        _ => return None,
    })
}

/// The length limit that applies to a frontend tag: PostgreSQL's small-message limit for
/// control messages, the auth-token limit for 'p', the general limit otherwise.
fn limit_for(tag: u8, limits: &Limits) -> usize {
    match tag {
        b'C' | b'c' | b'f' | b'D' | b'E' | b'H' | b'S' | b'X' => {
            limits.max_small_message_len.min(limits.max_message_len)
        }
        b'p' => limits.max_auth_message_len.min(limits.max_message_len),
        _ => limits.max_message_len,
    }
}

/// Decodes client messages after startup. Cheap to copy; holds only the limits and what
/// a 'p' message means now.
#[derive(Debug, Clone, Default)]
pub struct FrontendDecoder {
    /// Size limits.
    pub limits: Limits,
    /// How to read a 'p' message; update it from the server's Authentication requests.
    pub auth: AuthExpect,
}

impl FrontendDecoder {
    /// A decoder with these limits, expecting no authentication message.
    pub fn new(limits: Limits) -> FrontendDecoder {
        FrontendDecoder { limits, auth: AuthExpect::None }
    }

    /// Takes one message off `buf`: `Ok(None)` (nothing consumed) until it is complete.
    /// An unknown type byte fails as soon as it arrives.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<FrontendMessage>, ProtocolError> {
        let Some(&tag) = buf.first() else { return Ok(None) };
        let Some(message) = name(tag) else {
            return Err(ProtocolError::UnknownMessage { direction: Direction::Frontend, tag: Tag(tag) });
        };
        match split_frame(buf, message, limit_for(tag, &self.limits))? {
            Some(frame) => FrontendMessage::parse(&frame, self.auth).map(Some),
            None => Ok(None),
        }
    }

    /// Takes one raw message off `buf`, checking only its length (against the limit for its
    /// type; unknown types get the general limit).
    pub fn decode_frame(&self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        let Some(&tag) = buf.first() else { return Ok(None) };
        split_frame(buf, name(tag).unwrap_or("frontend message"), limit_for(tag, &self.limits))
    }

    /// The size of the whole message at the start of `buf` once all of it is there, checking
    /// only its length, as [`FrontendDecoder::decode_frame`] does without taking it off: for
    /// messages handled in place.
    pub fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
        let Some(&tag) = buf.first() else { return Ok(None) };
        frame_len(buf, name(tag).unwrap_or("frontend message"), limit_for(tag, &self.limits))
    }
}

impl FrontendMessage {
    /// Parses a whole frame (from [`FrontendDecoder::decode_frame`]); `auth` says what a 'p'
    /// message is.
    pub fn parse(frame: &Frame, auth: AuthExpect) -> Result<FrontendMessage, ProtocolError> {
        let tag = frame.tag();
        let Some(message) = name(tag) else {
            return Err(ProtocolError::UnknownMessage { direction: Direction::Frontend, tag: Tag(tag) });
        };
        let message = if tag == b'p' { auth.message_name() } else { message };
        let mut r = Reader::new(message, frame.body());
        let msg = match tag {
            b'B' => {
                let portal = r.cstr("portal name")?;
                let statement = r.cstr("statement name")?;
                let n = r.count("parameter format", 2)?;
                let mut param_formats = Vec::with_capacity(n);
                for i in 0..n {
                    param_formats.push(r.i16(format_args!("parameter format {}", i + 1))?);
                }
                let n = r.count("parameter value", 4)?;
                let mut params = Vec::with_capacity(n);
                for i in 0..n {
                    params.push(r.nullable(format_args!("parameter {}", i + 1))?);
                }
                let n = r.count("result format", 2)?;
                let mut result_formats = Vec::with_capacity(n);
                for i in 0..n {
                    result_formats.push(r.i16(format_args!("result format {}", i + 1))?);
                }
                FrontendMessage::Bind(Bind { portal, statement, param_formats, params, result_formats })
            }
            b'C' => {
                let target = Target::read(&mut r)?;
                FrontendMessage::Close { target, name: r.cstr("name")? }
            }
            b'd' => FrontendMessage::CopyData(r.rest()),
            b'c' => FrontendMessage::CopyDone,
            b'f' => FrontendMessage::CopyFail { message: r.cstr("error message")? },
            b'D' => {
                let target = Target::read(&mut r)?;
                FrontendMessage::Describe { target, name: r.cstr("name")? }
            }
            b'E' => {
                let portal = r.cstr("portal name")?;
                FrontendMessage::Execute { portal, max_rows: r.i32("row limit")? }
            }
            b'H' => FrontendMessage::Flush,
            b'F' => {
                let function = r.u32("function OID")?;
                let n = r.count("argument format", 2)?;
                let mut arg_formats = Vec::with_capacity(n);
                for i in 0..n {
                    arg_formats.push(r.i16(format_args!("argument format {}", i + 1))?);
                }
                let n = r.count("argument", 4)?;
                let mut args = Vec::with_capacity(n);
                for i in 0..n {
                    args.push(r.nullable(format_args!("argument {}", i + 1))?);
                }
                let result_format = r.i16("result format")?;
                FrontendMessage::FunctionCall(FunctionCall { function, arg_formats, args, result_format })
            }
            b'P' => {
                let name = r.cstr("statement name")?;
                let query = r.cstr("query string")?;
                let n = r.count("parameter type", 4)?;
                let mut param_types = Vec::with_capacity(n);
                for i in 0..n {
                    param_types.push(r.u32(format_args!("parameter type {}", i + 1))?);
                }
                FrontendMessage::Parse(Parse { name, query, param_types })
            }
            b'p' => match auth {
                AuthExpect::None => {
                    return Err(ProtocolError::Unexpected {
                        message: "PasswordMessage ('p')",
                        detail: "no authentication exchange is in progress".into(),
                    })
                }
                AuthExpect::Password => FrontendMessage::Password(r.cstr("password")?),
                AuthExpect::SaslInitial => {
                    let mechanism = r.utf8("mechanism name")?;
                    let data = r.nullable("initial response")?;
                    FrontendMessage::SaslInitialResponse { mechanism, data }
                }
                AuthExpect::SaslContinue => FrontendMessage::SaslResponse(r.rest()),
                AuthExpect::Gss => FrontendMessage::GssResponse(r.rest()),
            },
            b'Q' => FrontendMessage::Query(r.cstr("query string")?),
            b'S' => FrontendMessage::Sync,
            b'X' => FrontendMessage::Terminate,
            _ => return Err(ProtocolError::UnknownMessage { direction: Direction::Frontend, tag: Tag(tag) }),
        };
        r.finish()?;
        Ok(msg)
    }

    /// The message type byte.
    pub fn tag(&self) -> u8 {
        match self {
            FrontendMessage::Bind(_) => b'B',
            FrontendMessage::Close { .. } => b'C',
            FrontendMessage::CopyData(_) => b'd',
            FrontendMessage::CopyDone => b'c',
            FrontendMessage::CopyFail { .. } => b'f',
            FrontendMessage::Describe { .. } => b'D',
            FrontendMessage::Execute { .. } => b'E',
            FrontendMessage::Flush => b'H',
            FrontendMessage::FunctionCall(_) => b'F',
            FrontendMessage::Parse(_) => b'P',
            FrontendMessage::Password(_)
            | FrontendMessage::SaslInitialResponse { .. }
            | FrontendMessage::SaslResponse(_)
            | FrontendMessage::GssResponse(_) => b'p',
            FrontendMessage::Query(_) => b'Q',
            FrontendMessage::Sync => b'S',
            FrontendMessage::Terminate => b'X',
        }
    }

    /// Appends the message to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        write::message(buf, self.tag(), |buf| match self {
            FrontendMessage::Bind(b) => {
                write::cstr(buf, b.portal.as_bytes());
                write::cstr(buf, b.statement.as_bytes());
                let n = write::count16(buf, b.param_formats.len());
                b.param_formats.iter().take(n).for_each(|&f| buf.put_i16(f));
                let n = write::count16(buf, b.params.len());
                b.params.iter().take(n).for_each(|p| write::nullable(buf, p.as_deref()));
                let n = write::count16(buf, b.result_formats.len());
                b.result_formats.iter().take(n).for_each(|&f| buf.put_i16(f));
            }
            FrontendMessage::Close { target, name } | FrontendMessage::Describe { target, name } => {
                buf.put_u8(target.byte());
                write::cstr(buf, name.as_bytes());
            }
            FrontendMessage::CopyData(data) => buf.put_slice(data),
            FrontendMessage::CopyDone | FrontendMessage::Flush | FrontendMessage::Sync | FrontendMessage::Terminate => {
            }
            FrontendMessage::CopyFail { message } => write::cstr(buf, message.as_bytes()),
            FrontendMessage::Execute { portal, max_rows } => {
                write::cstr(buf, portal.as_bytes());
                buf.put_i32(*max_rows);
            }
            FrontendMessage::FunctionCall(f) => {
                buf.put_u32(f.function);
                let n = write::count16(buf, f.arg_formats.len());
                f.arg_formats.iter().take(n).for_each(|&a| buf.put_i16(a));
                let n = write::count16(buf, f.args.len());
                f.args.iter().take(n).for_each(|a| write::nullable(buf, a.as_deref()));
                buf.put_i16(f.result_format);
            }
            FrontendMessage::Parse(p) => {
                write::cstr(buf, p.name.as_bytes());
                write::cstr(buf, p.query.as_bytes());
                let n = write::count16(buf, p.param_types.len());
                p.param_types.iter().take(n).for_each(|&t| buf.put_u32(t));
            }
            FrontendMessage::Password(p) => write::cstr(buf, p.as_bytes()),
            FrontendMessage::SaslInitialResponse { mechanism, data } => {
                write::str_cstr(buf, mechanism);
                write::nullable(buf, data.as_deref());
            }
            FrontendMessage::SaslResponse(data) | FrontendMessage::GssResponse(data) => buf.put_slice(data),
            FrontendMessage::Query(q) => write::cstr(buf, q.as_bytes()),
        });
    }
}
