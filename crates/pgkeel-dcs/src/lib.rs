//! The distributed configuration store (DCS): the one place where cluster-wide truth lives.
//!
//! This crate owns
//! - [`Dcs`], a small key-value trait with etcd semantics (global revisions, per-key TTLs,
//!   atomic create, compare-and-set, delete, watch). Every implementation must pass the
//!   [`conformance`] suite, so the agent can rely on the same behaviour everywhere;
//! - [`local::LocalStore`], the embedded single-host store used by `pgkeel up`;
//! - [`cluster`], the key layout under `/pgkeel/<cluster>/` and the JSON values stored there,
//!   plus [`cluster::ClusterStore`], the typed operations the agent, CLI and proxy use.

pub mod cluster;
pub mod conformance;
pub mod local;

use std::time::Duration;

/// One key as stored, with its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// Full key, e.g. `/pgkeel/main/leader`.
    pub key: String,
    /// The stored bytes (JSON for every key pgkeel writes).
    pub value: Vec<u8>,
    /// Store-wide revision of the write that created this key (etcd `create_revision`).
    pub create_revision: u64,
    /// Store-wide revision of the last write to this key (etcd `mod_revision`). Used as the
    /// expected value for [`Dcs::compare_and_set`] and [`Dcs::delete`].
    pub mod_revision: u64,
    /// Time left before the key expires, when it was written with a TTL.
    pub ttl_left: Option<Duration>,
}

impl KeyValue {
    /// The value as UTF-8 text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.value).into_owned()
    }
}

/// Errors every DCS implementation reports. Callers branch on these: `Unavailable` and
/// `Timeout` mean "the store could not be asked" (the agent treats both as a DCS outage),
/// `Corrupt` and `Misconfigured` are operator problems.
#[derive(Debug, thiserror::Error)]
pub enum DcsError {
    /// The store could not be reached or did not answer.
    #[error("DCS unavailable: {0}")]
    Unavailable(String),
    /// A call took longer than its deadline.
    #[error("DCS call timed out after {0:?}")]
    Timeout(Duration),
    /// The stored data cannot be decoded.
    #[error("DCS data is corrupt: {0}")]
    Corrupt(String),
    /// The store is configured in a way that cannot work (e.g. a local store shared by two
    /// machines).
    #[error("DCS misconfigured: {0}")]
    Misconfigured(String),
}

/// Result alias for DCS calls.
pub type DcsResult<T> = Result<T, DcsError>;

/// A linearizable key-value store with per-key TTLs.
///
/// Semantics every implementation guarantees (checked by [`conformance`]):
/// - revisions are store-wide, strictly increasing with each successful write;
/// - a key written with a TTL disappears once the TTL has passed without a rewrite; a rewrite
///   (put / compare-and-set) sets a fresh TTL, `None` makes the key permanent;
/// - an expired key behaves exactly as an absent one for every operation;
/// - `create` succeeds for exactly one of any number of concurrent callers;
/// - `compare_and_set` and `delete` with an expected revision succeed only when the key's
///   current `mod_revision` equals it.
#[async_trait::async_trait]
pub trait Dcs: Send + Sync + std::fmt::Debug {
    /// Read one key.
    async fn get(&self, key: &str) -> DcsResult<Option<KeyValue>>;
    /// Read every key starting with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> DcsResult<Vec<KeyValue>>;
    /// Write unconditionally; returns the new revision.
    async fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> DcsResult<u64>;
    /// Write only if the key is absent; returns the new revision, or `None` if it exists.
    async fn create(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> DcsResult<Option<u64>>;
    /// Write only if the key exists with `mod_revision == expected`; returns the new revision,
    /// or `None` when the key is absent or was changed.
    async fn compare_and_set(
        &self,
        key: &str,
        value: &[u8],
        expected: u64,
        ttl: Option<Duration>,
    ) -> DcsResult<Option<u64>>;
    /// Delete a key; with `expected`, only if its `mod_revision` matches. Returns whether a key
    /// was deleted.
    async fn delete(&self, key: &str, expected: Option<u64>) -> DcsResult<bool>;
    /// Wait until `key` differs from what the caller knows (`known` is the `mod_revision` the
    /// caller saw, `None` for "absent"), or `timeout` passes. Returns the key's current state
    /// either way. Expiry of a TTL key counts as a change.
    async fn watch(&self, key: &str, known: Option<u64>, timeout: Duration) -> DcsResult<Option<KeyValue>>;
    /// A short human description, e.g. `local:/var/lib/pgkeel/dcs`.
    fn describe(&self) -> String;
}
