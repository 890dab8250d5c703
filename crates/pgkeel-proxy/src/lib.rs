//! The pgkeel proxy: a PostgreSQL wire-protocol proxy that pools connections, splits reads
//! from writes and follows failovers (see `docs/proxy.md`).
//!
//! Built so far: [`protocol`], the wire-protocol codec with no I/O. The listener, sessions,
//! pools, router and topology watcher are not built yet.

#![warn(missing_docs)]

pub mod protocol;
