//! Protocol-level named prepared statements in transaction mode.
//!
//! A client's consecutive transactions may run on different server connections, so a
//! statement it prepared on one may not exist on the next. The proxy keeps every named
//! statement a client prepares ([`StmtDef`]: query text and parameter types, never only a
//! hash) and gives it a server-side name derived from its text (`pgkeel_<hash>`), the same for
//! every client that prepares the same text. Each server connection remembers which of these
//! it has ([`ServerStatements`], bounded, least recently used first out). Before a client's
//! Bind or Describe, the proxy sends the server a Parse for a statement it lacks and drops the
//! answer; a client's Parse of a statement the server already has is answered by the proxy
//! alone; a client's Close is answered by the proxy and the statement stays on the server for
//! the next client.
//!
//! Names are compared with the full text: two texts whose hashes collide get the same name,
//! and the proxy then closes one before preparing the other (Odyssey's 32-bit hash collisions
//! silently ran the wrong statement).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::{FrontendMessage, Parse, Target, Text};
use crate::router::Class;

/// A statement as a client prepared it.
#[derive(Debug)]
pub struct StmtDef {
    /// Its name on every server connection.
    pub server_name: String,
    /// The query text.
    pub query: Text,
    /// The parameter types the client gave.
    pub param_types: Vec<u32>,
    /// Where it may run, once classified.
    pub class: OnceLock<Class>,
}

impl StmtDef {
    /// A statement with its server-side name.
    pub fn new(query: Text, param_types: Vec<u32>) -> StmtDef {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        query.as_bytes().hash(&mut h);
        param_types.hash(&mut h);
        StmtDef { server_name: format!("pgkeel_{:016x}", h.finish()), query, param_types, class: OnceLock::new() }
    }

    /// Whether `other` is the same statement (text and parameter types).
    pub fn same(&self, other: &StmtDef) -> bool {
        self.query == other.query && self.param_types == other.param_types
    }

    /// Appends the Parse that prepares it on a server.
    pub fn encode_parse(&self, out: &mut BytesMut) {
        FrontendMessage::Parse(Parse {
            name: Text::lossy(&self.server_name),
            query: self.query.clone(),
            param_types: self.param_types.clone(),
        })
        .encode(out);
    }
}

/// Appends a Close of statement `name`.
pub fn encode_close(name: &str, out: &mut BytesMut) {
    FrontendMessage::Close { target: Target::Statement, name: Text::lossy(name) }.encode(out);
}

/// Appends a Describe of statement `name`.
pub fn encode_describe(name: &str, out: &mut BytesMut) {
    FrontendMessage::Describe { target: Target::Statement, name: Text::lossy(name) }.encode(out);
}

/// The statements prepared on one server connection, at most `max`, with the least recently
/// used one evicted first.
#[derive(Debug, Default)]
pub struct ServerStatements {
    map: HashMap<String, (Arc<StmtDef>, u64)>,
    tick: u64,
}

impl ServerStatements {
    /// Whether the server has `def` (same name and text); marks it used.
    pub fn has(&mut self, def: &StmtDef) -> bool {
        self.tick += 1;
        match self.map.get_mut(&def.server_name) {
            Some((d, used)) if d.same(def) => {
                *used = self.tick;
                true
            }
            _ => false,
        }
    }

    /// The statement prepared under `name`, if any.
    pub fn get(&self, name: &str) -> Option<Arc<StmtDef>> {
        self.map.get(name).map(|(d, _)| d.clone())
    }

    /// Records that `def` is prepared on the server.
    pub fn insert(&mut self, def: Arc<StmtDef>) {
        self.tick += 1;
        self.map.insert(def.server_name.clone(), (def, self.tick));
    }

    /// Records that `name` is no longer prepared; returns what was.
    pub fn remove(&mut self, name: &str) -> Option<Arc<StmtDef>> {
        self.map.remove(name).map(|(d, _)| d)
    }

    /// The least recently used statement other than `keep`.
    pub fn victim(&self, keep: &str) -> Option<Arc<StmtDef>> {
        self.map
            .iter()
            .filter(|(n, _)| n.as_str() != keep)
            .min_by_key(|(_, (_, used))| *used)
            .map(|(_, (d, _))| d.clone())
    }

    /// How many statements the server has.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the server has none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Forgets them all (after `DISCARD ALL` or `DEALLOCATE ALL`).
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// Splits a NUL-terminated string off the front of `body`: (the string, the rest).
fn cstr(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = body.iter().position(|b| *b == 0)?;
    Some((&body[..nul], &body[nul + 1..]))
}

/// The statement name of a Bind body (portal, statement, ...).
pub fn bind_statement(body: &[u8]) -> Option<&[u8]> {
    let (_, rest) = cstr(body)?;
    cstr(rest).map(|(s, _)| s)
}

/// A Bind with its statement name replaced by `name`; `None` when the body is malformed
/// (then the original goes to the server, which reports the error).
pub fn rewrite_bind(body: &[u8], name: &str, out: &mut BytesMut) -> bool {
    let Some((portal, rest)) = cstr(body) else { return false };
    let Some((_, tail)) = cstr(rest) else { return false };
    let len = 4 + portal.len() + 1 + name.len() + 1 + tail.len();
    let Ok(len) = i32::try_from(len) else { return false };
    out.reserve(len as usize + 1);
    out.put_u8(b'B');
    out.put_i32(len);
    out.put_slice(portal);
    out.put_u8(0);
    out.put_slice(name.as_bytes());
    out.put_u8(0);
    out.put_slice(tail);
    true
}

/// The target ('S' or 'P') and name of a Describe or Close body.
pub fn target_and_name(body: &[u8]) -> Option<(u8, &[u8])> {
    let (&target, rest) = body.split_first()?;
    let (name, tail) = cstr(rest)?;
    (tail.is_empty() && matches!(target, b'S' | b'P')).then_some((target, name))
}

/// A client's statement name as a map key.
pub fn key(name: &[u8]) -> Bytes {
    Bytes::copy_from_slice(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Bind, FrontendDecoder};

    #[test]
    fn names_follow_the_text_and_types() {
        let a = StmtDef::new(Text::lossy("select $1"), vec![23]);
        let b = StmtDef::new(Text::lossy("select $1"), vec![23]);
        let c = StmtDef::new(Text::lossy("select $1"), vec![25]);
        assert_eq!(a.server_name, b.server_name);
        assert!(a.same(&b) && !a.same(&c));
        assert_ne!(a.server_name, c.server_name);
        assert!(a.server_name.starts_with("pgkeel_") && a.server_name.len() < 64);
    }

    #[test]
    fn the_server_side_set_is_a_bounded_lru() {
        let mut s = ServerStatements::default();
        let defs: Vec<Arc<StmtDef>> =
            (0..3).map(|i| Arc::new(StmtDef::new(Text::lossy(&format!("select {i}")), vec![]))).collect();
        for d in &defs {
            s.insert(d.clone());
        }
        assert!(s.has(&defs[0]));
        assert_eq!(s.victim(&defs[2].server_name).unwrap().server_name, defs[1].server_name);
        // A colliding name with another text is not "has".
        let other =
            StmtDef { server_name: defs[0].server_name.clone(), ..StmtDef::new(Text::lossy("select 9"), vec![]) };
        assert!(!s.has(&other));
        assert!(s.remove(&defs[1].server_name).is_some());
        assert_eq!(s.len(), 2);
        s.clear();
        assert!(s.is_empty());
    }

    #[test]
    fn bind_and_describe_are_rewritten_in_place() {
        let mut frame = BytesMut::new();
        FrontendMessage::Bind(Bind {
            portal: Text::lossy("p1"),
            statement: Text::lossy("s1"),
            param_formats: vec![1],
            params: vec![Some(Bytes::from_static(b"\0\0\0\x05")), None],
            result_formats: vec![0],
        })
        .encode(&mut frame);
        let body = &frame[5..];
        assert_eq!(bind_statement(body), Some(&b"s1"[..]));
        let mut out = BytesMut::new();
        assert!(rewrite_bind(body, "pgkeel_00", &mut out));
        let msg = FrontendDecoder::default().decode(&mut out).unwrap().unwrap();
        let FrontendMessage::Bind(b) = msg else { panic!("{msg:?}") };
        assert_eq!((b.portal.as_bytes(), b.statement.as_bytes()), (&b"p1"[..], &b"pgkeel_00"[..]));
        assert_eq!(b.params, vec![Some(Bytes::from_static(b"\0\0\0\x05")), None]);
        assert!(!rewrite_bind(b"no terminator", "x", &mut out));
        assert_eq!(target_and_name(b"Ss1\0"), Some((b'S', &b"s1"[..])));
        assert_eq!(target_and_name(b"Xs1\0"), None);
        assert_eq!(target_and_name(b"Ss1\0junk"), None);
    }
}
