//! Read/write classification of statements, with PostgreSQL's own grammar (`pg_query`, which
//! embeds the server's parser), and the `SET pgkeel.route` command the proxy answers itself.
//!
//! A statement is one of four [`Class`]es:
//!
//! - [`Class::Read`]: a plain `SELECT` (or `VALUES`, `TABLE`, `SHOW`, `EXPLAIN` of a read,
//!   `COPY ... TO`, `BEGIN READ ONLY`, `DECLARE` of a read cursor) that calls none of the
//!   primary-only functions: a replica can run it;
//! - [`Class::Neutral`]: transaction control and session commands that read and write nothing
//!   (`COMMIT`, `ROLLBACK`, `SAVEPOINT`, `SET`, `RESET`, `DISCARD`, `DEALLOCATE`, `FETCH`,
//!   `CLOSE`): they go wherever the rest of the unit goes, and to the primary alone;
//! - [`Class::Begin`]: `BEGIN` or `START TRANSACTION` without `READ ONLY`: the transaction runs
//!   on the primary, but the statement writes nothing itself, so it does not count as a write
//!   for read-your-writes (the transaction's own statements do);
//! - [`Class::Write`]: everything else, including `SELECT ... FOR UPDATE/SHARE`, `SELECT INTO`,
//!   data-modifying CTEs, calls of `nextval`, `setval`, advisory locks and the configured
//!   `primary_functions`, statements that do not parse, and any text containing
//!   `pgkeel:primary` (the comment override).
//!
//! A multi-statement string takes the highest class of its statements. Results are cached per
//! statement text in a bounded cache ([`Classifier`]).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use serde::ser::{self, Serialize};

/// Where a statement may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Reads and writes nothing (transaction control, session settings).
    Neutral,
    /// Only reads: a replica can run it.
    Read,
    /// Opens a read-write transaction: the primary only, though it writes nothing itself.
    Begin,
    /// Writes, locks, or cannot be proven read-only: the primary only.
    Write,
}

/// Functions that never run on a replica, or that make no sense there, by name (matched
/// against the unqualified name, and against `schema.name` when the call is qualified).
const PRIMARY_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "currval",
    "lastval",
    "txid_current",
    "pg_current_xact_id",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    "pg_notify",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_logical_emit_message",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_cancel_backend",
    "pg_terminate_backend",
    "pg_reload_conf",
];

/// Name prefixes of primary-only functions: advisory locks and large objects.
const PRIMARY_FUNCTION_PREFIXES: &[&str] = &["pg_advisory_", "pg_try_advisory_", "lo_", "pg_replication_origin_"];

/// The comment override: a statement whose text contains it goes to the primary.
pub const PRIMARY_HINT: &str = "pgkeel:primary";

/// Statements longer than this are classified every time instead of being cached.
const MAX_CACHED_LEN: usize = 16 * 1024;

/// Classifies statements and caches the results per statement text.
#[derive(Debug)]
pub struct Classifier {
    /// Extra primary-only functions (`primary_functions`, and the volatile functions found in
    /// the catalog), lowercase names and `schema.name`s.
    functions: HashSet<String>,
    cache: Mutex<Cache>,
}

impl Classifier {
    /// A classifier that also sends calls of `functions` (names or `schema.name`) to the
    /// primary, caching up to `cache_size` statement texts.
    pub fn new(functions: &[String], cache_size: usize) -> Classifier {
        Classifier {
            functions: functions.iter().map(|f| f.to_lowercase()).collect(),
            cache: Mutex::new(Cache::new(cache_size)),
        }
    }

    /// The class of a statement text (one or more statements, in the client's encoding).
    pub fn classify(&self, text: &[u8]) -> Class {
        if contains(text, PRIMARY_HINT.as_bytes()) {
            return Class::Write;
        }
        let cacheable = text.len() <= MAX_CACHED_LEN;
        let key = if cacheable { cache_key(text) } else { Cow::Borrowed(text) };
        if cacheable {
            if let Some(c) = self.cache.lock().unwrap_or_else(PoisonError::into_inner).get(&key) {
                return c;
            }
        }
        let class = match std::str::from_utf8(text) {
            Ok(s) => classify_text(s, &self.functions),
            // Not UTF-8 (a client_encoding such as LATIN1): the parser cannot read it.
            Err(_) => Class::Write,
        };
        if cacheable {
            self.cache.lock().unwrap_or_else(PoisonError::into_inner).insert(&key, class);
        }
        class
    }
}

/// The cache key of a statement: its text with every numeric constant replaced by `0`, so
/// statements that differ only in literal numbers (`... WHERE aid = 4711`) share an entry.
/// A number's value never changes where a statement may run. Digits inside quoted strings,
/// quoted identifiers and comments, and digits that continue a word (`t2`, `$1`), are kept.
fn cache_key(text: &[u8]) -> Cow<'_, [u8]> {
    if !text.iter().any(u8::is_ascii_digit) {
        return Cow::Borrowed(text);
    }
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
    while let Some(&b) = text.get(i) {
        match b {
            b'\'' | b'"' => {
                // A quoted string or identifier, with doubled quotes inside; backslash escapes
                // in E'' strings.
                let escapes = b == b'\'' && i > 0 && matches!(text.get(i - 1), Some(b'E' | b'e'));
                let start = i;
                i += 1;
                while let Some(&c) = text.get(i) {
                    if escapes && c == b'\\' {
                        i += 2;
                        continue;
                    }
                    i += 1;
                    if c == b {
                        if text.get(i) == Some(&b) {
                            i += 1;
                            continue;
                        }
                        break;
                    }
                }
                out.extend_from_slice(&text[start..i.min(text.len())]);
            }
            b'-' if text.get(i + 1) == Some(&b'-') => {
                let end = text[i..].iter().position(|c| *c == b'\n').map_or(text.len(), |p| i + p);
                out.extend_from_slice(&text[i..end]);
                i = end;
            }
            b'/' if text.get(i + 1) == Some(&b'*') => {
                let end = text[i + 2..].windows(2).position(|w| w == b"*/").map_or(text.len(), |p| i + 2 + p + 2);
                out.extend_from_slice(&text[i..end]);
                i = end;
            }
            b'$' => {
                // A dollar-quoted string ($$...$$, $tag$...$tag$), or a parameter ($1).
                let tag_end = text[i + 1..].iter().position(|c| !word(*c) || *c == b'$').map(|p| i + 1 + p);
                match tag_end {
                    Some(e) if text.get(e) == Some(&b'$') && !text.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                        let tag = &text[i..=e];
                        let body_end = text[e + 1..]
                            .windows(tag.len())
                            .position(|w| w == tag)
                            .map_or(text.len(), |p| e + 1 + p + tag.len());
                        out.extend_from_slice(&text[i..body_end]);
                        i = body_end;
                    }
                    _ => {
                        // A parameter: `$` and its digits are a word.
                        let end = text[i + 1..].iter().position(|c| !word(*c)).map_or(text.len(), |p| i + 1 + p);
                        out.extend_from_slice(&text[i..end]);
                        i = end;
                    }
                }
            }
            b'0'..=b'9' => {
                let end =
                    text[i..].iter().position(|c| !(c.is_ascii_digit() || *c == b'.')).map_or(text.len(), |p| i + p);
                out.push(b'0');
                i = end;
            }
            b if word(b) => {
                let end = text[i..].iter().position(|c| !word(*c)).map_or(text.len(), |p| i + p);
                out.extend_from_slice(&text[i..end]);
                i = end;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    Cow::Owned(out)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.len() >= needle.len() && haystack.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

/// A bounded cache with two generations: lookups hit the current one or promote from the
/// previous one; when the current one is full it becomes the previous one. At most `cap`
/// entries, and the ones used recently survive.
#[derive(Debug)]
struct Cache {
    half: usize,
    current: HashMap<Box<[u8]>, Class>,
    previous: HashMap<Box<[u8]>, Class>,
}

impl Cache {
    fn new(cap: usize) -> Cache {
        Cache { half: (cap / 2).max(1), current: HashMap::new(), previous: HashMap::new() }
    }

    fn get(&mut self, key: &[u8]) -> Option<Class> {
        if let Some(c) = self.current.get(key) {
            return Some(*c);
        }
        let (k, c) = self.previous.remove_entry(key)?;
        self.put(k, c);
        Some(c)
    }

    fn insert(&mut self, key: &[u8], class: Class) {
        self.put(key.into(), class);
    }

    fn put(&mut self, key: Box<[u8]>, class: Class) {
        if self.current.len() >= self.half {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, class);
    }
}

/// Classifies `sql` with the PostgreSQL grammar. `extra` are more primary-only functions
/// (lowercase names or `schema.name`).
pub fn classify_text(sql: &str, extra: &HashSet<String>) -> Class {
    let parsed = match pg_query::parse(sql, 0) {
        Ok(p) => p,
        // A syntax error (or a tree too deep to decode): the primary reports it.
        Err(_) => return Class::Write,
    };
    let mut class = Class::Neutral;
    for raw in &parsed.protobuf.stmts {
        let Some(node) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else { continue };
        let c = statement_class(node);
        if c == Class::Write {
            return Class::Write;
        }
        // Look inside for writes, locking clauses and primary-only functions.
        let mut w = Walker { found: Found::default(), stack: Vec::new(), capture: None, extra };
        if node.serialize(&mut w).is_err() || w.found.write {
            return Class::Write;
        }
        class = class.max(c);
    }
    class
}

/// The class of one statement from its kind alone (its insides are checked separately).
fn statement_class(node: &pg_query::NodeEnum) -> Class {
    use pg_query::protobuf::TransactionStmtKind as K;
    use pg_query::NodeEnum as N;
    match node {
        N::SelectStmt(_) | N::VariableShowStmt(_) | N::ExplainStmt(_) | N::DeclareCursorStmt(_) => Class::Read,
        N::CopyStmt(c) if !c.is_from && c.filename.is_empty() && !c.is_program => Class::Read,
        N::TransactionStmt(t) => match K::try_from(t.kind) {
            Ok(K::TransStmtBegin | K::TransStmtStart) if begins_read_only(&t.options) => Class::Read,
            Ok(K::TransStmtBegin | K::TransStmtStart) => Class::Begin,
            Ok(K::TransStmtCommit | K::TransStmtRollback) => Class::Neutral,
            Ok(K::TransStmtSavepoint | K::TransStmtRelease | K::TransStmtRollbackTo) => Class::Neutral,
            _ => Class::Write,
        },
        N::VariableSetStmt(_)
        | N::DiscardStmt(_)
        | N::DeallocateStmt(_)
        | N::FetchStmt(_)
        | N::ClosePortalStmt(_)
        | N::ConstraintsSetStmt(_) => Class::Neutral,
        _ => Class::Write,
    }
}

/// Whether `BEGIN`/`START TRANSACTION` options ask for a read-only transaction a replica can
/// run (SERIALIZABLE is not available on a hot standby).
fn begins_read_only(options: &[pg_query::Node]) -> bool {
    use pg_query::protobuf::a_const::Val;
    use pg_query::NodeEnum as N;
    let mut read_only = false;
    for o in options {
        let Some(N::DefElem(d)) = o.node.as_ref() else { continue };
        let value = d.arg.as_ref().and_then(|a| a.node.as_ref()).and_then(|n| match n {
            N::AConst(c) => c.val.as_ref(),
            _ => None,
        });
        match (d.defname.as_str(), value) {
            ("transaction_read_only", Some(Val::Ival(i))) => read_only = i.ival != 0,
            ("transaction_read_only", Some(Val::Boolval(b))) => read_only = b.boolval,
            ("transaction_isolation", Some(Val::Sval(s))) if s.sval.eq_ignore_ascii_case("serializable") => {
                return false
            }
            _ => {}
        }
    }
    read_only
}

/// What the walk over a statement's tree found.
#[derive(Debug, Default)]
struct Found {
    /// A write, a locking clause, `SELECT INTO`, or a primary-only function.
    write: bool,
}

/// Walks a parse tree through its `serde::Serialize` implementation (every node type has
/// one), so no node kind is missed: the tree's struct names and fields are visited in order.
struct Walker<'a> {
    found: Found,
    /// Struct names from the root to the current one.
    stack: Vec<&'static str>,
    /// While inside `FuncCall.funcname`: the name parts seen so far.
    capture: Option<Vec<String>>,
    extra: &'a HashSet<String>,
}

impl Walker<'_> {
    fn function_called(&mut self, parts: &[String]) {
        let Some(name) = parts.last() else { return };
        let name = name.to_lowercase();
        let qualified = parts.join(".").to_lowercase();
        let builtin =
            PRIMARY_FUNCTIONS.contains(&name.as_str()) || PRIMARY_FUNCTION_PREFIXES.iter().any(|p| name.starts_with(p));
        let configured = self.extra.contains(&name) || self.extra.contains(&qualified);
        if builtin || configured {
            self.found.write = true;
        }
    }
}

/// The walker's error type (the walk never fails by itself).
#[derive(Debug)]
struct WalkError(String);

impl std::fmt::Display for WalkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WalkError {}

impl ser::Error for WalkError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        WalkError(msg.to_string())
    }
}

type R = Result<(), WalkError>;

impl<'a, 'b> ser::Serializer for &'a mut Walker<'b> {
    type Ok = ();
    type Error = WalkError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn serialize_bool(self, _: bool) -> R {
        Ok(())
    }
    fn serialize_i8(self, _: i8) -> R {
        Ok(())
    }
    fn serialize_i16(self, _: i16) -> R {
        Ok(())
    }
    fn serialize_i32(self, _: i32) -> R {
        Ok(())
    }
    fn serialize_i64(self, _: i64) -> R {
        Ok(())
    }
    fn serialize_u8(self, _: u8) -> R {
        Ok(())
    }
    fn serialize_u16(self, _: u16) -> R {
        Ok(())
    }
    fn serialize_u32(self, _: u32) -> R {
        Ok(())
    }
    fn serialize_u64(self, _: u64) -> R {
        Ok(())
    }
    fn serialize_f32(self, _: f32) -> R {
        Ok(())
    }
    fn serialize_f64(self, _: f64) -> R {
        Ok(())
    }
    fn serialize_char(self, _: char) -> R {
        Ok(())
    }
    fn serialize_str(self, v: &str) -> R {
        if let Some(parts) = self.capture.as_mut() {
            if self.stack.last() == Some(&"String") {
                parts.push(v.to_string());
            }
        }
        Ok(())
    }
    fn serialize_bytes(self, _: &[u8]) -> R {
        Ok(())
    }
    fn serialize_none(self) -> R {
        Ok(())
    }
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> R {
        value.serialize(self)
    }
    fn serialize_unit(self) -> R {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> R {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> R {
        Ok(())
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(self, _: &'static str, value: &T) -> R {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> R {
        value.serialize(self)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self, WalkError> {
        Ok(self)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self, WalkError> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, WalkError> {
        Ok(self)
    }
    fn serialize_tuple_variant(self, _: &'static str, _: u32, _: &'static str, _: usize) -> Result<Self, WalkError> {
        Ok(self)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self, WalkError> {
        Ok(self)
    }
    fn serialize_struct(self, name: &'static str, _: usize) -> Result<Self, WalkError> {
        match name {
            // Data-modifying statements anywhere (a CTE, a rule body), SELECT INTO and
            // CREATE TABLE AS, FOR UPDATE/SHARE.
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" | "IntoClause" | "LockingClause" => {
                self.found.write = true
            }
            _ => {}
        }
        self.stack.push(name);
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        name: &'static str,
        _: u32,
        _: &'static str,
        len: usize,
    ) -> Result<Self, WalkError> {
        self.serialize_struct(name, len)
    }
}

impl ser::SerializeSeq for &mut Walker<'_> {
    type Ok = ();
    type Error = WalkError;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> R {
        value.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeTuple for &mut Walker<'_> {
    type Ok = ();
    type Error = WalkError;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> R {
        value.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeTupleStruct for &mut Walker<'_> {
    type Ok = ();
    type Error = WalkError;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, value: &T) -> R {
        value.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeTupleVariant for &mut Walker<'_> {
    type Ok = ();
    type Error = WalkError;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, value: &T) -> R {
        value.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeMap for &mut Walker<'_> {
    type Ok = ();
    type Error = WalkError;
    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> R {
        key.serialize(&mut **self)
    }
    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> R {
        value.serialize(&mut **self)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeStruct for &mut Walker<'_> {
    type Ok = ();
    type Error = WalkError;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, key: &'static str, value: &T) -> R {
        if key == "funcname" && self.stack.last() == Some(&"FuncCall") && self.capture.is_none() {
            self.capture = Some(Vec::new());
            let r = value.serialize(&mut **self);
            let parts = self.capture.take().unwrap_or_default();
            self.function_called(&parts);
            return r;
        }
        value.serialize(&mut **self)
    }
    fn end(self) -> R {
        self.stack.pop();
        Ok(())
    }
}

impl ser::SerializeStructVariant for &mut Walker<'_> {
    type Ok = ();
    type Error = WalkError;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, key: &'static str, value: &T) -> R {
        ser::SerializeStruct::serialize_field(self, key, value)
    }
    fn end(self) -> R {
        self.stack.pop();
        Ok(())
    }
}

/// Routing for a client's reads, set with `SET pgkeel.route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMode {
    /// Classify each statement: reads to replicas, the rest to the primary.
    Auto,
    /// Everything to the primary.
    Primary,
    /// Everything to replicas (the primary when none is eligible).
    Replica,
}

impl RouteMode {
    /// `auto`, `primary` or `replica`.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteMode::Auto => "auto",
            RouteMode::Primary => "primary",
            RouteMode::Replica => "replica",
        }
    }
}

/// The lag limits of `max_replica_lag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagLimit {
    /// Bytes of WAL behind the primary's reported position; `u64::MAX`: no limit.
    pub bytes: u64,
    /// Replay delay; `None`: no limit.
    pub time: Option<std::time::Duration>,
}

impl LagLimit {
    /// Whether `r` is within both limits. A limit whose measure the replica's agent has not
    /// reported (yet) excludes it: an unknown lag is not a small one.
    pub fn allows(&self, r: &crate::topology::Replica) -> bool {
        let bytes_ok = self.bytes == u64::MAX || r.lag.is_some_and(|l| l <= self.bytes);
        let time_ok = self.time.is_none_or(|t| r.lag_ms.is_some_and(|ms| u128::from(ms) <= t.as_millis()));
        bytes_ok && time_ok
    }
}

/// Picks one of `n` eligible replicas (index) by `strategy`.
///
/// - `turn`: a counter that grows by one per choice (round robin and weighted);
/// - `random`: a random number (random);
/// - `in_use(i)`: server connections in use on replica `i` (least connections: the first
///   with the fewest);
/// - `weight(i)`: its weight (weighted: replica `i` gets `weight(i)` of every
///   `sum of weights` turns, in runs; a weight of 0 never).
///
/// `None` when `n` is 0 or every weight is 0 (weighted).
pub fn choose_replica(
    strategy: crate::config::LoadBalance,
    n: usize,
    turn: usize,
    random: u64,
    in_use: impl Fn(usize) -> usize,
    weight: impl Fn(usize) -> u32,
) -> Option<usize> {
    use crate::config::LoadBalance;
    if n == 0 {
        return None;
    }
    match strategy {
        LoadBalance::RoundRobin => Some(turn % n),
        LoadBalance::Random => Some((random % n as u64) as usize),
        LoadBalance::LeastConnections => (0..n).min_by_key(|i| in_use(*i)),
        LoadBalance::Weighted => {
            let total: u64 = (0..n).map(|i| u64::from(weight(i))).sum();
            if total == 0 {
                return None;
            }
            let mut at = turn as u64 % total;
            for i in 0..n {
                let w = u64::from(weight(i));
                if at < w {
                    return Some(i);
                }
                at -= w;
            }
            None
        }
    }
}

/// A command about `pgkeel.route` that the proxy answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteCommand {
    /// `SET pgkeel.route = ...` / `SET pgkeel.route TO ...`.
    Set(RouteMode),
    /// `RESET pgkeel.route` or `SET pgkeel.route TO DEFAULT`: back to the listener's mode.
    Reset,
    /// `SHOW pgkeel.route`.
    Show,
    /// A malformed command about `pgkeel.route`: the error message.
    Invalid(String),
}

/// The setting the proxy handles itself.
pub const ROUTE_SETTING: &str = "pgkeel.route";

/// Whether `text` starts (after white space) with SET, RESET or SHOW: the first test of
/// [`route_command`], which reads only the start, so it may be given a whole Query body
/// (its NUL included) before the statement's end is looked for.
pub fn may_be_route_command(text: &[u8]) -> bool {
    // Run on every simple Query and every Parse: the usual statement starts at once, and its
    // first two or three letters tell.
    let first = match text.first() {
        Some(b) if !b.is_ascii_whitespace() => 0,
        _ => match text.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => i,
            None => return false,
        },
    };
    let Some(head) = text.get(first..first + 5) else { return false };
    // ASCII letters compared case-insensitively: only `X` and `x` give `x` here.
    let l = |i: usize| head[i] | 0x20;
    match l(0) {
        b's' => (l(1) == b'e' && l(2) == b't') || (l(1) == b'h' && l(2) == b'o' && l(3) == b'w'),
        b'r' => l(1) == b'e' && l(2) == b's' && l(3) == b'e' && l(4) == b't',
        _ => false,
    }
}

/// Recognises `SET [SESSION] pgkeel.route {=|TO} value`, `RESET pgkeel.route` and `SHOW
/// pgkeel.route` (one statement, optionally ending with `;`, any case, the value bare or
/// quoted). `None` for anything else. Cheap enough to run on every simple query.
pub fn route_command(text: &[u8]) -> Option<RouteCommand> {
    if !may_be_route_command(text) || !contains(text, ROUTE_SETTING.as_bytes()) {
        return None;
    }
    let text = std::str::from_utf8(text).ok()?;
    let body = text.trim().trim_end_matches(|c: char| c == ';' || c.is_ascii_whitespace());
    let words: Vec<&str> = tokens(body);
    let lower: Vec<String> = words.iter().map(|w| w.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();
    let usage = "use SET pgkeel.route = primary | replica | auto (or RESET pgkeel.route)";
    match l.as_slice() {
        ["show", ROUTE_SETTING] => Some(RouteCommand::Show),
        ["reset", ROUTE_SETTING] => Some(RouteCommand::Reset),
        ["set", "local", ROUTE_SETTING, ..] => Some(RouteCommand::Invalid(format!(
            "SET LOCAL pgkeel.route is not supported: the route is chosen when a transaction starts; {usage}"
        ))),
        ["set", ROUTE_SETTING, op, value] | ["set", "session", ROUTE_SETTING, op, value]
            if matches!(*op, "=" | "to") =>
        {
            let v = value.trim_matches('\'');
            match v {
                "primary" => Some(RouteCommand::Set(RouteMode::Primary)),
                "replica" => Some(RouteCommand::Set(RouteMode::Replica)),
                "auto" => Some(RouteCommand::Set(RouteMode::Auto)),
                "default" if !value.starts_with('\'') => Some(RouteCommand::Reset),
                _ => Some(RouteCommand::Invalid(format!("invalid value for pgkeel.route: {value}; {usage}"))),
            }
        }
        [first, ..] if l.contains(&ROUTE_SETTING) && matches!(*first, "set" | "reset" | "show") => {
            Some(RouteCommand::Invalid(format!("cannot parse {body:?}; {usage}")))
        }
        _ => None,
    }
}

/// Splits on whitespace, with `=` as a token of its own.
fn tokens(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for word in s.split_ascii_whitespace() {
        let mut rest = word;
        while let Some(i) = rest.find('=') {
            if i > 0 {
                out.push(&rest[..i]);
            }
            out.push("=");
            rest = &rest[i + 1..];
        }
        if !rest.is_empty() {
            out.push(rest);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    mod replica_choice {
        use super::super::*;
        use crate::config::LoadBalance;
        use crate::topology::Replica;
        use std::time::Duration;

        fn replica(lag: Option<u64>, lag_ms: Option<u64>) -> Replica {
            Replica { name: "n2".into(), address: "n2:5432".into(), replayed_lsn: None, lag, lag_ms }
        }

        #[test]
        fn lag_limits_in_bytes_and_time() {
            let bytes = LagLimit { bytes: 1000, time: None };
            assert!(bytes.allows(&replica(Some(1000), None)));
            assert!(!bytes.allows(&replica(Some(1001), Some(0))));
            assert!(!bytes.allows(&replica(None, Some(0))), "unknown byte lag");
            let time = LagLimit { bytes: u64::MAX, time: Some(Duration::from_secs(5)) };
            assert!(time.allows(&replica(None, Some(5000))), "no byte limit");
            assert!(time.allows(&replica(Some(u64::MAX), Some(0))));
            assert!(!time.allows(&replica(Some(0), Some(5001))));
            assert!(!time.allows(&replica(Some(0), None)), "unknown replay lag");
            let both = LagLimit { bytes: 1000, time: Some(Duration::from_millis(500)) };
            assert!(both.allows(&replica(Some(10), Some(10))));
            assert!(!both.allows(&replica(Some(10), Some(600))));
            assert!(!both.allows(&replica(Some(2000), Some(10))));
        }

        #[test]
        fn strategies() {
            let none = |_| 0;
            let one = |_| 1;
            for s in
                [LoadBalance::RoundRobin, LoadBalance::Random, LoadBalance::LeastConnections, LoadBalance::Weighted]
            {
                assert_eq!(choose_replica(s, 0, 7, 7, none, one), None, "{s:?} with no replica");
            }
            let rr: Vec<_> = (0..6).map(|t| choose_replica(LoadBalance::RoundRobin, 3, t, 0, none, one)).collect();
            assert_eq!(rr, [Some(0), Some(1), Some(2), Some(0), Some(1), Some(2)]);
            assert_eq!(choose_replica(LoadBalance::Random, 3, 0, 10, none, one), Some(1));
            let in_use = [4, 1, 1];
            assert_eq!(choose_replica(LoadBalance::LeastConnections, 3, 0, 0, |i| in_use[i], one), Some(1));
        }

        #[test]
        fn weighted_shares_and_zero_weights() {
            let weights = [3u32, 0, 1];
            let mut counts = [0; 3];
            for turn in 0..400 {
                let i = choose_replica(LoadBalance::Weighted, 3, turn, 0, |_| 0, |i| weights[i]).expect("a replica");
                counts[i] += 1;
            }
            assert_eq!(counts, [300, 0, 100], "3:0:1");
            assert_eq!(choose_replica(LoadBalance::Weighted, 2, 5, 0, |_| 0, |_| 0), None, "all weights 0");
            // Equal weights behave as round robin.
            let eq: Vec<_> = (0..4).map(|t| choose_replica(LoadBalance::Weighted, 2, t, 0, |_| 0, |_| 1)).collect();
            assert_eq!(eq, [Some(0), Some(1), Some(0), Some(1)]);
        }
    }

    const P: &str = "primary";
    const R: &str = "replica";

    /// Statements and where the auto listener sends them (Neutral goes to the primary).
    const TABLE: &[(&str, &str)] = &[
        // Plain reads.
        ("select 1", R),
        ("SELECT * FROM accounts WHERE id = $1", R),
        ("select a.id, b.v from a join b using (id) where a.x > 3 order by 1 limit 10", R),
        ("select count(*) from t group by x having count(*) > 1", R),
        ("select * from (select * from t) s", R),
        ("with c as (select * from t) select * from c", R),
        ("with recursive r(n) as (select 1 union all select n + 1 from r where n < 5) select * from r", R),
        ("select 1 union select 2", R),
        ("select 1 except select 2", R),
        ("values (1), (2)", R),
        ("table accounts", R),
        ("select now(), current_setting('pgkeel.term'), pg_is_in_recovery()", R),
        ("select pg_last_wal_replay_lsn()", R),
        ("select exists (select 1 from t where id = 1)", R),
        ("select * from generate_series(1, 10)", R),
        ("select lower(name) from users where email like '%nextval%'", R),
        ("select 'select nextval(1)'", R),
        ("select * from t where id = any($1::int[])", R),
        ("select row_number() over (partition by a order by b) from t", R),
        ("show transaction_isolation", R),
        ("show all", R),
        ("explain select * from t", R),
        ("copy t to stdout", R),
        ("copy (select * from t) to stdout with (format csv)", R),
        ("begin read only", R),
        ("start transaction read only", R),
        ("begin isolation level repeatable read, read only", R),
        ("begin read only; select 1; commit", R),
        ("select 1; select 2", R),
        ("set search_path = app; select * from t", R),
        ("declare c cursor for select * from t", R),
        ("select x from t where y in (select y from u)", R),
        // Writes and DDL.
        ("insert into t values (1)", P),
        ("INSERT INTO t SELECT * FROM u", P),
        ("update t set v = v + 1 where id = $1", P),
        ("delete from t where id = 1", P),
        ("merge into t using u on t.id = u.id when matched then update set v = u.v", P),
        ("insert into t values (1) on conflict (id) do nothing returning id", P),
        ("create table x(id int)", P),
        ("alter table t add column c int", P),
        ("drop table t", P),
        ("truncate t", P),
        ("create index on t(v)", P),
        ("vacuum t", P),
        ("analyze t", P),
        ("grant select on t to bob", P),
        ("copy t from stdin", P),
        ("copy t to '/tmp/t.csv'", P),
        ("lock table t in exclusive mode", P),
        ("refresh materialized view mv", P),
        ("create temp table tmp(x int)", P),
        ("listen ch", P),
        ("notify ch, 'x'", P),
        ("call proc(1)", P),
        ("do $$ begin perform 1; end $$", P),
        ("prepare p as select 1", P),
        ("execute p", P),
        ("checkpoint", P),
        // Reads that lock or write.
        ("select * from t for update", P),
        ("select * from t where id = 1 for share", P),
        ("select * from t for no key update skip locked", P),
        ("select * from (select * from t for update) s", P),
        ("select * into newt from t", P),
        ("create table n as select * from t", P),
        ("with d as (delete from t returning *) select * from d", P),
        ("with i as (insert into t values (1) returning id) select id from i", P),
        ("with u as (update t set v = 1 returning *) select count(*) from u", P),
        ("explain analyze insert into t values (1)", P),
        ("explain insert into t values (1)", P),
        // Primary-only functions.
        ("select nextval('s')", P),
        ("SELECT NEXTVAL('s')", P),
        ("select pg_catalog.nextval('s')", P),
        ("select setval('s', 10)", P),
        ("select currval('s')", P),
        ("select id from t where id = nextval('s')", P),
        ("select coalesce(x, nextval('s')) from t", P),
        ("select pg_advisory_lock(1)", P),
        ("select pg_try_advisory_xact_lock(1, 2)", P),
        ("select pg_advisory_unlock_all()", P),
        ("select case when x then pg_advisory_xact_lock(1) end from t", P),
        ("select * from t order by nextval('s')", P),
        ("select * from t limit (select nextval('s'))", P),
        ("values (nextval('s'))", P),
        ("select txid_current()", P),
        ("select pg_current_wal_lsn()", P),
        ("select pg_notify('ch', 'x')", P),
        ("select lo_create(0)", P),
        ("select app.bump(1)", P),
        ("select audit_log('x')", P),
        ("select 1; insert into t values (1)", P),
        ("select 1; select nextval('s')", P),
        // Transactions.
        ("begin", P),
        ("BEGIN", P),
        ("start transaction", P),
        ("begin read write", P),
        ("begin isolation level serializable read only", P),
        ("begin; select 1; commit", P),
        ("commit", P),
        ("rollback", P),
        ("savepoint a", P),
        ("prepare transaction 'x'", P),
        ("commit prepared 'x'", P),
        ("set search_path = app", P),
        ("reset all", P),
        ("discard all", P),
        // Overrides and oddities.
        ("/* pgkeel:primary */ select 1", P),
        ("select 1 -- pgkeel:primary", P),
        ("select * from t /* PGKEEL:PRIMARY */", P),
        ("selec 1", P),
        ("", P),
        (";", P),
    ];

    #[test]
    fn statements_are_routed_by_the_grammar() {
        let c = Classifier::new(&["app.bump".into(), "AUDIT_LOG".into()], 100);
        assert!(TABLE.len() >= 60);
        let mut wrong = Vec::new();
        for (sql, want) in TABLE {
            // Twice: the second answer comes from the cache.
            for _ in 0..2 {
                let got = match c.classify(sql.as_bytes()) {
                    Class::Read => R,
                    Class::Neutral | Class::Begin | Class::Write => P,
                };
                if got != *want {
                    wrong.push(format!("{sql:?}: {got}, expected {want}"));
                }
            }
        }
        assert!(wrong.is_empty(), "misrouted:\n{}", wrong.join("\n"));
    }

    #[test]
    fn classes_of_transaction_control_and_settings() {
        let c = Classifier::new(&[], 100);
        for sql in ["commit", "rollback", "end", "set x = 1", "release a", "rollback to a", "discard all"] {
            assert_eq!(c.classify(sql.as_bytes()), Class::Neutral, "{sql}");
        }
        // A read-write transaction starts on the primary without being a write itself; what
        // it runs decides.
        for sql in ["begin", "start transaction", "begin read write", "begin; select 1", "begin; commit"] {
            assert_eq!(c.classify(sql.as_bytes()), Class::Begin, "{sql}");
        }
        for sql in ["begin; insert into t values (1)", "begin; select nextval('s')", "begin; lock t"] {
            assert_eq!(c.classify(sql.as_bytes()), Class::Write, "{sql}");
        }
        assert_eq!(c.classify(b"begin read only; select 1"), Class::Read);
        // The non-UTF-8 text of a LATIN1 client cannot be parsed: primary.
        assert_eq!(c.classify(b"select '\xe9'"), Class::Write);
    }

    #[test]
    fn hostile_statements_do_not_crash_the_classifier() {
        let c = Classifier::new(&[], 10);
        let deep = format!("select {}1{}", "(".repeat(20_000), ")".repeat(20_000));
        assert_eq!(c.classify(deep.as_bytes()), Class::Write);
        let long = format!("select {}", vec!["1"; 50_000].join(" + "));
        let _ = c.classify(long.as_bytes());
        let many = "select 1;".repeat(10_000);
        assert_eq!(c.classify(many.as_bytes()), Class::Read);
        for i in 0..100 {
            c.classify(format!("select {i}").as_bytes());
        }
        let cache = c.cache.lock().unwrap();
        assert!(cache.current.len() + cache.previous.len() <= 10, "the cache is bounded");
    }

    #[test]
    fn numbers_share_a_cache_entry_and_nothing_else_does() {
        let key = |s: &str| String::from_utf8(cache_key(s.as_bytes()).into_owned()).unwrap();
        assert_eq!(key("select * from t where aid = 4711"), "select * from t where aid = 0");
        assert_eq!(key("select 1.5, 22 + t2.c3, $12, x1"), "select 0, 0 + t2.c3, $12, x1");
        assert_eq!(
            key("select '42', \"7up\", e'\\'9', 'it''s 5' -- 6\n, 7"),
            "select '42', \"7up\", e'\\'9', 'it''s 5' -- 6\n, 0"
        );
        assert_eq!(key("select /* 1 */ $$ 2 $$, $f$ 3 $f$, 4"), "select /* 1 */ $$ 2 $$, $f$ 3 $f$, 0");
        assert_eq!(key("select 'unterminated 5"), "select 'unterminated 5");
        assert_eq!(key("no digits"), "no digits");
        // Truncated or odd input never panics.
        for s in ["$", "$a", "$1", "'", "\"", "/*", "--", "e'\\", "$a$ 1", "1.", "..1"] {
            let _ = cache_key(s.as_bytes());
        }
        let c = Classifier::new(&[], 100);
        assert_eq!(c.classify(b"select * from t where id = 1"), Class::Read);
        assert_eq!(c.classify(b"select * from t where id = 2"), Class::Read);
        assert_eq!(c.cache.lock().unwrap().current.len(), 1, "one entry for both");
        assert_eq!(c.classify(b"select * from t where id = 2 for update"), Class::Write);
    }

    #[test]
    fn route_commands_are_recognised() {
        use RouteCommand as C;
        for (sql, want) in [
            ("set pgkeel.route = primary", Some(C::Set(RouteMode::Primary))),
            ("SET pgkeel.route TO replica;", Some(C::Set(RouteMode::Replica))),
            ("  set session pgkeel.route='auto' ", Some(C::Set(RouteMode::Auto))),
            ("set pgkeel.route=primary", Some(C::Set(RouteMode::Primary))),
            ("set pgkeel.route to default", Some(C::Reset)),
            ("RESET pgkeel.route", Some(C::Reset)),
            ("show pgkeel.route;", Some(C::Show)),
            ("set search_path = x", None),
            ("select 'set pgkeel.route = primary'", None),
            ("set", None),
        ] {
            assert_eq!(route_command(sql.as_bytes()), want, "{sql}");
            // As a Query body, NUL included, a command passes the first test.
            let body = [sql.as_bytes(), b"\0"].concat();
            assert!(want.is_none() || may_be_route_command(&body), "{sql}");
        }
        assert!(!may_be_route_command(b"select 1\0"));
        assert!(!may_be_route_command(b" \t\n"));
        for (text, want) in [
            (&b"SeT x"[..], true),
            (b"\n  ShOw all", true),
            (b"Reset all", true),
            (b"settings", true),
            (b"SELECT 1", false),
            (b"sHOx 1", false),
            (b"rollback", false),
            (b"resex", false),
            (b"show", false),
            (b"\x13et x", false),
            (b"", false),
        ] {
            assert_eq!(may_be_route_command(text), want, "{:?}", String::from_utf8_lossy(text));
        }
        for sql in ["set pgkeel.route = both", "set local pgkeel.route = primary", "set pgkeel.route = 1; select 1"] {
            assert!(matches!(route_command(sql.as_bytes()), Some(C::Invalid(_))), "{sql}");
        }
    }
}
