//! The distributed configuration store (DCS): the one place where cluster-wide truth lives.
//!
//! This crate owns
//! - [`Dcs`], a small key-value trait with etcd semantics (global revisions, per-key TTLs,
//!   atomic create, compare-and-set, delete, watch). Every implementation must pass the
//!   [`conformance`] suite, so the agent can rely on the same behaviour everywhere;
//! - [`local::LocalStore`], the embedded single-host store used by `pgkeel up`;
//! - [`etcd::EtcdStore`], a client of an etcd v3 cluster (3.4 or newer) for clusters that span
//!   machines;
//! - [`cluster`], the key layout under `/pgkeel/<cluster>/` and the JSON values stored there,
//!   plus [`cluster::ClusterStore`], the typed operations the agent, CLI and proxy use.

pub mod cluster;
pub mod conformance;
pub mod etcd;
pub mod local;
#[doc(hidden)]
pub mod testing;

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

/// How closely a store keeps the TTLs it is given. The ideal (the local store) keeps a TTL to
/// the millisecond, removes a key the moment its TTL runs out and reports `ttl_left` on every
/// read. A networked store can only come close: etcd grants leases in whole seconds, never
/// shorter than its minimum, and expires them from a periodic sweep. Callers that choose TTLs,
/// and the [`conformance`] suite, allow for the difference with these numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPrecision {
    /// A TTL below this is raised to it. Zero: any TTL is kept.
    pub min_ttl: Duration,
    /// A TTL is rounded up to a whole multiple of this. Zero: kept as given.
    pub granularity: Duration,
    /// How long after its TTL has run out an expired key may still be read: the store's expiry
    /// sweep interval plus the time to commit the removal. Zero: gone at once.
    pub expiry_delay: Duration,
    /// Whether [`Dcs::list`] reports `ttl_left`. When false, `list` returns `None` there and
    /// only [`Dcs::get`] and [`Dcs::watch`] report it (reading every key's TTL costs the store
    /// one more request per key).
    pub ttl_left_in_list: bool,
}

impl TtlPrecision {
    /// TTLs kept exactly, `ttl_left` reported everywhere.
    pub const EXACT: TtlPrecision = TtlPrecision {
        min_ttl: Duration::ZERO,
        granularity: Duration::ZERO,
        expiry_delay: Duration::ZERO,
        ttl_left_in_list: true,
    };

    /// The TTL a key written with `ttl` really gets: rounded up to the granularity, then raised
    /// to the minimum.
    pub fn effective_ttl(&self, ttl: Duration) -> Duration {
        let rounded = if self.granularity.is_zero() {
            ttl
        } else {
            const NANOS_PER_SEC: u128 = 1_000_000_000;
            let g = self.granularity.as_nanos();
            let nanos = ttl.as_nanos().div_ceil(g).saturating_mul(g);
            match (u64::try_from(nanos / NANOS_PER_SEC), u32::try_from(nanos % NANOS_PER_SEC)) {
                (Ok(secs), Ok(sub)) => Duration::new(secs, sub),
                _ => Duration::MAX,
            }
        };
        rounded.max(self.min_ttl)
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
    /// How closely this store keeps TTLs; the default is [`TtlPrecision::EXACT`].
    fn ttl_precision(&self) -> TtlPrecision {
        TtlPrecision::EXACT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_ttl_rounds_up_then_raises_to_the_minimum() {
        assert_eq!(TtlPrecision::EXACT.effective_ttl(Duration::from_millis(1234)), Duration::from_millis(1234));
        let etcd = TtlPrecision {
            min_ttl: Duration::from_secs(2),
            granularity: Duration::from_secs(1),
            expiry_delay: Duration::from_secs(1),
            ttl_left_in_list: false,
        };
        assert_eq!(etcd.effective_ttl(Duration::from_millis(100)), Duration::from_secs(2));
        assert_eq!(etcd.effective_ttl(Duration::from_secs(2)), Duration::from_secs(2));
        assert_eq!(etcd.effective_ttl(Duration::from_millis(2001)), Duration::from_secs(3));
        assert_eq!(etcd.effective_ttl(Duration::from_secs(30)), Duration::from_secs(30));
        assert_eq!(etcd.effective_ttl(Duration::MAX), Duration::MAX, "no overflow");
    }
}
