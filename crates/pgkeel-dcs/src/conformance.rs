//! The DCS conformance suite: the behaviour every [`Dcs`] implementation must show, written
//! against the trait only, so the local store, the etcd store and any later one run the same
//! checks.
//!
//! Each check is a `pub async fn(Arc<dyn Dcs>, &str)` that only touches keys under the given
//! prefix (and, for the [`ClusterStore`] checks, under `/pgkeel/<cluster>/` with a cluster name
//! derived from the prefix), so checks can share one store as long as their prefixes are
//! unique. A violation panics with a message naming the store and the broken rule: this is a
//! test suite, to be called from `#[tokio::test]`s (multi-threaded runtime, for the races).
//! [`run_all`] runs every check concurrently.
//!
//! Timing: checks never sleep longer than needed. Waits for TTL expiry poll with a deadline,
//! and timing assertions leave generous slack for loaded test machines.
//!
//! TTL bounds follow the store's own [`TtlPrecision`] (from [`Dcs::ttl_precision`]) rather
//! than being loosened for everyone: a check writes with the short TTL it always asks for, then
//! holds the store to the TTL it says it grants (etcd: whole seconds, at least its lease
//! minimum of 2 s) and to the expiry delay it admits (etcd: its 500 ms expiry sweep plus a
//! commit). A store that reports [`TtlPrecision::EXACT`], like the local one, is held to
//! exactly the bounds the suite had before it was parametric. Likewise `ttl_left` is required
//! from `list` only of stores that claim [`TtlPrecision::ttl_left_in_list`]; the others must
//! report it from `get`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Barrier;

use crate::cluster::{
    ClusterStore, FailoverValue, HistoryEntry, InitializeValue, MemberTags, MemberValue, ProxyValue, Role, StatusValue,
    SwitchoverValue,
};
use crate::{Dcs, DcsResult, KeyValue, TtlPrecision};

/// TTL the expiry checks ask for; the store may raise it ([`TtlPrecision::effective_ttl`]).
const SHORT_TTL: Duration = Duration::from_secs(1);
/// A TTL key must be gone this long after its (effective) TTL has run out, plus the store's
/// admitted [`TtlPrecision::expiry_delay`].
const EXPIRY_SLACK: Duration = Duration::from_secs(2);
/// How often expiry checks poll.
const EXPIRY_POLL: Duration = Duration::from_millis(50);
/// A watch must report a change (or an expiry, plus the store's expiry delay) within this much
/// of it happening.
const WATCH_LATENCY: Duration = Duration::from_millis(300);
/// A watch that must return "promptly" must do so within this, while its timeout is longer.
const PROMPT: Duration = Duration::from_secs(2);
/// Timeout of watches that must run until their timeout.
const WATCH_TIMEOUT: Duration = Duration::from_millis(400);
/// Delay before a helper task changes a watched key, so the watch is already waiting.
const CHANGE_DELAY: Duration = Duration::from_millis(100);
/// TTL for keys that must not expire during a check.
const LONG_TTL: Duration = Duration::from_secs(30);

/// The TTL bounds a check holds one store to, derived from its [`TtlPrecision`].
struct Timing {
    /// The store's precision, as it reports it.
    precision: TtlPrecision,
    /// The TTL a key written with [`SHORT_TTL`] really gets.
    short_ttl: Duration,
    /// A key written with [`SHORT_TTL`] must be gone this long after it was written.
    expiry_limit: Duration,
    /// How late a watch may report an expiry.
    expiry_latency: Duration,
}

impl Timing {
    fn of(store: &dyn Dcs) -> Timing {
        let precision = store.ttl_precision();
        let short_ttl = precision.effective_ttl(SHORT_TTL);
        Timing {
            precision,
            short_ttl,
            expiry_limit: short_ttl + EXPIRY_SLACK + precision.expiry_delay,
            expiry_latency: WATCH_LATENCY + precision.expiry_delay,
        }
    }
}

/// Unwrap a DCS result or fail the check with the store, the operation and the error.
fn ok<T>(store: &dyn Dcs, what: &str, r: DcsResult<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("[{}] {what} failed: {e}", store.describe()),
    }
}

/// Read `key`, which must be present.
async fn must_get(store: &dyn Dcs, key: &str) -> KeyValue {
    match ok(store, &format!("get {key}"), store.get(key).await) {
        Some(kv) => kv,
        None => panic!("[{}] {key} must be present but get returned None", store.describe()),
    }
}

/// Poll `key` (written with a TTL of `ttl`) until it is absent; fail if it is still present
/// `limit` after `start`. Returns the instant absence was observed (after the read that saw
/// it).
async fn wait_until_absent(store: &dyn Dcs, key: &str, ttl: Duration, start: Instant, limit: Duration) -> Instant {
    loop {
        let got = ok(store, &format!("get {key}"), store.get(key).await);
        let now = Instant::now();
        if got.is_none() {
            return now;
        }
        assert!(
            now < start + limit,
            "[{}] {key} (written with a TTL of {ttl:?}) is still present {limit:?} later: {got:?}",
            store.describe()
        );
        tokio::time::sleep(EXPIRY_POLL).await;
    }
}

/// A cluster name unique to `prefix` and `check`, for the [`ClusterStore`] checks (whose keys
/// live under `/pgkeel/<cluster>/`, outside the prefix).
fn cluster_name(prefix: &str, check: &str) -> String {
    let tag: String = prefix.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    format!("conformance-{}-{check}", tag.trim_matches('-'))
}

/// Run `n` copies of `f(i)` released at the same moment by a barrier; returns their results
/// in task order.
async fn race<T, F, Fut>(n: usize, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let barrier = Arc::new(Barrier::new(n));
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let barrier = barrier.clone();
        let fut = f(i);
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            fut.await
        }));
    }
    let mut results = Vec::with_capacity(n);
    for h in handles {
        match h.await {
            Ok(v) => results.push(v),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("racing task failed: {e}"),
        }
    }
    results
}

/// Panic unless exactly one of `results` is `Some`; returns its index and value.
fn exactly_one<T: std::fmt::Debug + Clone>(store: &dyn Dcs, what: &str, results: &[Option<T>]) -> (usize, T) {
    let winners: Vec<(usize, T)> = results.iter().enumerate().filter_map(|(i, r)| r.clone().map(|v| (i, v))).collect();
    assert_eq!(
        winners.len(),
        1,
        "[{}] {what}: exactly one of {} racers must win, got {winners:?}",
        store.describe(),
        results.len()
    );
    winners[0].clone()
}

/// Calls `$m!(check, check, ...)` with the name of every conformance check, so each
/// implementation's test file can generate one test per check from this single list:
///
/// ```ignore
/// macro_rules! tests { ($($check:ident),* $(,)?) => { $( /* a #[tokio::test] per check */ )* } }
/// pgkeel_dcs::for_each_conformance_check!(tests);
/// ```
#[macro_export]
macro_rules! for_each_conformance_check {
    ($m:ident) => {
        $m!(
            describe_is_set,
            put_get_list,
            revisions,
            create_once,
            concurrent_create,
            compare_and_set,
            concurrent_compare_and_set,
            delete,
            ttl_expiry,
            ttl_renewal,
            watch_change,
            watch_timeout,
            watch_expiry,
            watch_absent_until_created,
            cluster_leader_terms,
            cluster_leader_expiry,
            cluster_concurrent_acquire,
            cluster_load,
        );
    };
}

/// Run every check, concurrently, each under its own sub-prefix of `prefix`; panics naming
/// the checks that failed (each failure's own message is printed as it happens).
pub async fn run_all(store: Arc<dyn Dcs>, prefix: &str) {
    let mut handles = Vec::new();
    macro_rules! spawn_checks {
        ($($check:ident),* $(,)?) => {$({
            let store = store.clone();
            let prefix = format!("{prefix}{}/", stringify!($check));
            handles.push((stringify!($check), tokio::spawn(async move { $check(store, &prefix).await })));
        })*};
    }
    crate::for_each_conformance_check!(spawn_checks);
    let mut failed = Vec::new();
    for (name, handle) in handles {
        if let Err(e) = handle.await {
            failed.push(format!("{name} ({e})"));
        }
    }
    assert!(failed.is_empty(), "[{}] conformance checks failed: {}", store.describe(), failed.join(", "));
}

/// `describe()` returns a non-empty description.
pub async fn describe_is_set(store: Arc<dyn Dcs>, _prefix: &str) {
    assert!(!store.describe().trim().is_empty(), "describe() must not be empty");
}

/// put / get / list round trip; list is sorted by key and limited to the prefix; an absent
/// key reads as `None`.
pub async fn put_get_list(store: Arc<dyn Dcs>, prefix: &str) {
    let s = store.as_ref();
    let base = format!("{prefix}list/");
    let (a, b, c) = (format!("{base}a"), format!("{base}b"), format!("{base}c/nested"));

    assert_eq!(ok(s, "get absent", s.get(&format!("{base}absent")).await), None, "absent key must read as None");
    assert!(
        ok(s, "list empty", s.list(&base).await).is_empty(),
        "[{}] list of an unused prefix must be empty",
        s.describe()
    );

    // Written out of order: list must sort.
    let rc = ok(s, "put c", s.put(&c, b"3", None).await);
    let ra = ok(s, "put a", s.put(&a, b"\"one\"", None).await);
    let rb = ok(s, "put b", s.put(&b, b"{\"two\":2}", None).await);
    // Under the check's prefix but not under `base`: must not be listed.
    ok(s, "put outside", s.put(&format!("{prefix}list-outside"), b"0", None).await);
    ok(s, "put parent", s.put(&format!("{prefix}list"), b"0", None).await);

    let kv = must_get(s, &a).await;
    assert_eq!(kv.key, a);
    assert_eq!(kv.value, b"\"one\"");
    assert_eq!(kv.text(), "\"one\"");
    assert_eq!(kv.mod_revision, ra, "get must report the revision put returned");
    assert_eq!(kv.create_revision, ra, "a new key's create_revision is its first write's revision");
    assert_eq!(kv.ttl_left, None, "a key put without TTL has no ttl_left");

    let listed = ok(s, "list", s.list(&base).await);
    let keys: Vec<&str> = listed.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        [a.as_str(), b.as_str(), c.as_str()],
        "[{}] list must return the prefix's keys sorted",
        s.describe()
    );
    let revs: Vec<u64> = listed.iter().map(|kv| kv.mod_revision).collect();
    assert_eq!(revs, [ra, rb, rc]);
    assert_eq!(listed[1].value, b"{\"two\":2}");
    assert_eq!(listed[2].value, b"3");

    let nested = ok(s, "list nested", s.list(&format!("{base}c/")).await);
    assert_eq!(nested.len(), 1, "list must filter by prefix: {nested:?}");
    assert_eq!(nested[0].key, c);
    assert!(ok(s, "list none", s.list(&format!("{base}zzz")).await).is_empty());

    // Values are bytes: non-UTF-8 must survive.
    let bin = format!("{base}binary");
    ok(s, "put binary", s.put(&bin, &[0, 159, 146, 150, 255], None).await);
    assert_eq!(must_get(s, &bin).await.value, [0, 159, 146, 150, 255], "binary values must round-trip");
}

/// Revisions strictly increase with every write; `create_revision` is stable across updates
/// and `mod_revision` follows each write.
pub async fn revisions(store: Arc<dyn Dcs>, prefix: &str) {
    let s = store.as_ref();
    let (a, b, c) = (format!("{prefix}rev/a"), format!("{prefix}rev/b"), format!("{prefix}rev/c"));
    let r1 = ok(s, "put a", s.put(&a, b"1", None).await);
    let r2 = ok(s, "put b", s.put(&b, b"1", None).await);
    assert!(r2 > r1, "revisions must strictly increase: {r1} then {r2}");
    let r3 = ok(s, "put a again", s.put(&a, b"2", None).await);
    assert!(r3 > r2, "revisions must strictly increase: {r2} then {r3}");
    let kv = must_get(s, &a).await;
    assert_eq!(kv.create_revision, r1, "create_revision must stay stable across updates");
    assert_eq!(kv.mod_revision, r3, "mod_revision must follow the last write");

    let r4 = ok(s, "create c", s.create(&c, b"1", None).await).expect("create of a fresh key must succeed");
    assert!(r4 > r3, "create must take a new revision: {r3} then {r4}");
    let r5 = ok(s, "cas a", s.compare_and_set(&a, b"3", r3, None).await).expect("cas with the current revision");
    assert!(r5 > r4, "compare_and_set must take a new revision: {r4} then {r5}");
    let kv = must_get(s, &a).await;
    assert_eq!((kv.create_revision, kv.mod_revision), (r1, r5), "cas keeps create_revision, sets mod_revision");

    assert!(ok(s, "delete b", s.delete(&b, None).await));
    let r6 = ok(s, "put b after delete", s.put(&b, b"2", None).await);
    assert!(r6 > r5, "revisions must keep increasing across deletes: {r5} then {r6}");
    let kv = must_get(s, &b).await;
    assert_eq!(kv.create_revision, r6, "a key recreated after delete gets a new create_revision");
}

/// `create` succeeds once, fails while the key exists, and succeeds again after delete and
/// after expiry.
pub async fn create_once(store: Arc<dyn Dcs>, prefix: &str) {
    let s = store.as_ref();
    let key = format!("{prefix}create/k");
    let r1 = ok(s, "create", s.create(&key, b"1", None).await).expect("first create must succeed");
    assert_eq!(ok(s, "second create", s.create(&key, b"2", None).await), None, "create of a present key must fail");
    let kv = must_get(s, &key).await;
    assert_eq!((kv.value.as_slice(), kv.mod_revision), (b"1".as_slice(), r1), "a failed create must not write");

    assert!(ok(s, "delete", s.delete(&key, None).await));
    let r2 = ok(s, "create after delete", s.create(&key, b"3", None).await).expect("create after delete must succeed");
    assert!(r2 > r1);
    let kv = must_get(s, &key).await;
    assert_eq!((kv.value.as_slice(), kv.create_revision), (b"3".as_slice(), r2));

    let ttl_key = format!("{prefix}create/ttl");
    let timing = Timing::of(s);
    let start = Instant::now();
    ok(s, "create ttl", s.create(&ttl_key, b"1", Some(SHORT_TTL)).await).expect("create with TTL must succeed");
    assert_eq!(ok(s, "create ttl again", s.create(&ttl_key, b"2", None).await), None);
    wait_until_absent(s, &ttl_key, timing.short_ttl, start, timing.expiry_limit).await;
    let r3 = ok(s, "create after expiry", s.create(&ttl_key, b"3", None).await);
    let r3 = r3.unwrap_or_else(|| panic!("[{}] create after expiry must succeed", s.describe()));
    let kv = must_get(s, &ttl_key).await;
    assert_eq!((kv.create_revision, kv.ttl_left), (r3, None), "a key created after expiry is a new, permanent key");
}

/// 16 tasks race `create` on one key: exactly one wins, and its value is stored.
pub async fn concurrent_create(store: Arc<dyn Dcs>, prefix: &str) {
    let key = format!("{prefix}race/create");
    let results = race(16, |i| {
        let (store, key) = (store.clone(), key.clone());
        async move { ok(store.as_ref(), "racing create", store.create(&key, i.to_string().as_bytes(), None).await) }
    })
    .await;
    let s = store.as_ref();
    let (winner, rev) = exactly_one(s, "concurrent create", &results);
    let kv = must_get(s, &key).await;
    assert_eq!(kv.text(), winner.to_string(), "the stored value must be the winner's");
    assert_eq!(kv.mod_revision, rev);
}

/// `compare_and_set` succeeds with the current revision only; it fails with a stale one and
/// on an absent key, without writing.
pub async fn compare_and_set(store: Arc<dyn Dcs>, prefix: &str) {
    let s = store.as_ref();
    let key = format!("{prefix}cas/k");
    let r1 = ok(s, "put", s.put(&key, b"1", None).await);
    let r2 = ok(s, "cas", s.compare_and_set(&key, b"2", r1, None).await).expect("cas with the current revision");
    assert!(r2 > r1);
    assert_eq!(ok(s, "stale cas", s.compare_and_set(&key, b"3", r1, None).await), None, "cas with a stale revision");
    let kv = must_get(s, &key).await;
    assert_eq!((kv.value.as_slice(), kv.mod_revision), (b"2".as_slice(), r2), "a failed cas must not write");

    let absent = format!("{prefix}cas/absent");
    assert_eq!(ok(s, "cas absent", s.compare_and_set(&absent, b"x", r2, None).await), None, "cas on an absent key");
    assert_eq!(ok(s, "cas absent 0", s.compare_and_set(&absent, b"x", 0, None).await), None, "cas on an absent key");
    assert_eq!(ok(s, "get absent", s.get(&absent).await), None, "a failed cas must not create the key");
}

/// 8 tasks race `compare_and_set` from the same revision: exactly one wins.
pub async fn concurrent_compare_and_set(store: Arc<dyn Dcs>, prefix: &str) {
    let key = format!("{prefix}race/cas");
    let start = ok(store.as_ref(), "put", store.put(&key, b"start", None).await);
    let results = race(8, |i| {
        let (store, key) = (store.clone(), key.clone());
        async move {
            ok(store.as_ref(), "racing cas", store.compare_and_set(&key, i.to_string().as_bytes(), start, None).await)
        }
    })
    .await;
    let s = store.as_ref();
    let (winner, rev) = exactly_one(s, "concurrent compare_and_set", &results);
    let kv = must_get(s, &key).await;
    assert_eq!((kv.text(), kv.mod_revision), (winner.to_string(), rev), "the stored value must be the winner's");
}

/// `delete` with and without an expected revision; deleting an absent key returns false.
pub async fn delete(store: Arc<dyn Dcs>, prefix: &str) {
    let s = store.as_ref();
    let key = format!("{prefix}delete/k");
    assert!(!ok(s, "delete absent", s.delete(&key, None).await), "delete of an absent key must return false");
    assert!(!ok(s, "delete absent rev", s.delete(&key, Some(1)).await), "delete of an absent key must return false");

    let r1 = ok(s, "put", s.put(&key, b"1", None).await);
    let r2 = ok(s, "put", s.put(&key, b"2", None).await);
    assert!(!ok(s, "stale delete", s.delete(&key, Some(r1)).await), "delete with a stale revision must fail");
    assert_eq!(must_get(s, &key).await.mod_revision, r2, "a failed delete must leave the key");
    assert!(ok(s, "delete", s.delete(&key, Some(r2)).await), "delete with the current revision must succeed");
    assert_eq!(ok(s, "get deleted", s.get(&key).await), None);
    assert!(!ok(s, "delete again", s.delete(&key, None).await));

    let other = format!("{prefix}delete/other");
    ok(s, "put other", s.put(&other, b"1", None).await);
    assert!(ok(s, "unconditional delete", s.delete(&other, None).await));
    assert_eq!(ok(s, "get deleted", s.get(&other).await), None);
    assert!(ok(s, "list", s.list(&format!("{prefix}delete/")).await).is_empty(), "deleted keys must not be listed");
}

/// A TTL key is present at once with `ttl_left <= ttl`, disappears after the TTL (not
/// before), and then behaves as absent for every operation. `ttl` is the TTL the store grants:
/// the one asked for, rounded and raised as its [`TtlPrecision`] says.
pub async fn ttl_expiry(store: Arc<dyn Dcs>, prefix: &str) {
    let s = store.as_ref();
    let timing = Timing::of(s);
    let ttl = timing.short_ttl;
    let key = format!("{prefix}ttl/k");
    let permanent = format!("{prefix}ttl/permanent");
    let start = Instant::now();
    let rev = ok(s, "put ttl", s.put(&key, b"1", Some(SHORT_TTL)).await);
    ok(s, "put permanent", s.put(&permanent, b"1", None).await);

    let kv = must_get(s, &key).await;
    let left = kv.ttl_left.unwrap_or_else(|| panic!("[{}] a TTL key must report ttl_left", s.describe()));
    assert!(left <= ttl && !left.is_zero(), "[{}] ttl_left must be in (0, {ttl:?}], got {left:?}", s.describe());
    assert_eq!(must_get(s, &permanent).await.ttl_left, None);
    let listed = ok(s, "list", s.list(&format!("{prefix}ttl/")).await);
    assert_eq!(listed.len(), 2, "a live TTL key must be listed: {listed:?}");
    if timing.precision.ttl_left_in_list {
        assert!(listed[0].ttl_left.is_some(), "[{}] list must report ttl_left of a TTL key", s.describe());
    }
    assert_eq!(listed[1].ttl_left, None, "[{}] a permanent key has no ttl_left in a list", s.describe());

    let gone = wait_until_absent(s, &key, ttl, start, timing.expiry_limit).await;
    assert!(
        gone.duration_since(start) >= ttl - Duration::from_millis(100),
        "[{}] a key with a TTL of {ttl:?} (asked for {SHORT_TTL:?}) disappeared after only {:?}",
        s.describe(),
        gone.duration_since(start)
    );
    let listed = ok(s, "list", s.list(&format!("{prefix}ttl/")).await);
    assert_eq!(
        listed.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
        [permanent.as_str()],
        "expired keys are not listed"
    );
    assert_eq!(ok(s, "cas expired", s.compare_and_set(&key, b"2", rev, None).await), None, "cas on an expired key");
    assert!(!ok(s, "delete expired", s.delete(&key, None).await), "delete of an expired key must return false");
    assert!(
        !ok(s, "delete expired rev", s.delete(&key, Some(rev)).await),
        "delete of an expired key must return false"
    );
    let r2 = ok(s, "create", s.create(&key, b"3", None).await).expect("create over an expired key must succeed");
    let kv = must_get(s, &key).await;
    assert_eq!(kv.create_revision, r2, "a key recreated after expiry gets a new create_revision");
}

/// Rewriting a TTL key with put or compare-and-set renews its TTL; a put with `ttl: None`
/// makes it permanent.
pub async fn ttl_renewal(store: Arc<dyn Dcs>, prefix: &str) {
    let s = store.as_ref();
    let timing = Timing::of(s);
    let ttl = timing.short_ttl;
    let by_put = format!("{prefix}renew/put");
    let by_cas = format!("{prefix}renew/cas");
    let permanent = format!("{prefix}renew/permanent");
    let control = format!("{prefix}renew/control");
    ok(s, "put", s.put(&by_put, b"1", Some(SHORT_TTL)).await);
    let cas_rev = ok(s, "put", s.put(&by_cas, b"1", Some(SHORT_TTL)).await);
    ok(s, "put", s.put(&permanent, b"1", Some(SHORT_TTL)).await);
    ok(s, "put", s.put(&control, b"1", Some(SHORT_TTL)).await);
    let written = Instant::now();

    tokio::time::sleep_until((written + ttl / 2).into()).await;
    let renewed = Instant::now();
    ok(s, "renew by put", s.put(&by_put, b"2", Some(SHORT_TTL)).await);
    let renewed_cas = ok(s, "renew by cas", s.compare_and_set(&by_cas, b"2", cas_rev, Some(SHORT_TTL)).await);
    assert!(renewed_cas.is_some(), "[{}] cas of a live TTL key must succeed", s.describe());
    ok(s, "make permanent", s.put(&permanent, b"2", None).await);
    assert_eq!(must_get(s, &permanent).await.ttl_left, None, "put with ttl None must make the key permanent");

    // Once the original TTL has run out, the renewed keys must still be there.
    wait_until_absent(s, &control, ttl, written, timing.expiry_limit).await;
    let checked = Instant::now();
    let (put_kv, cas_kv) = (ok(s, "get", s.get(&by_put).await), ok(s, "get", s.get(&by_cas).await));
    // Only conclusive while the renewed TTL cannot have run out yet (a badly overloaded
    // machine may get here late).
    if checked.duration_since(renewed) < ttl - Duration::from_millis(100) {
        assert!(
            put_kv.is_some(),
            "[{}] a put must renew the TTL, but the key expired with its first TTL",
            s.describe()
        );
        assert!(
            cas_kv.is_some(),
            "[{}] a cas must renew the TTL, but the key expired with its first TTL",
            s.describe()
        );
    }
    let kv = must_get(s, &permanent).await;
    assert_eq!((kv.value.as_slice(), kv.ttl_left), (b"2".as_slice(), None), "a permanent key must not expire");
}

/// A watch returns promptly when another task changes or deletes the key, and at once when
/// the caller's view is already out of date.
pub async fn watch_change(store: Arc<dyn Dcs>, prefix: &str) {
    let s = store.as_ref();
    let key = format!("{prefix}watch/change");
    let r1 = ok(s, "put", s.put(&key, b"1", None).await);

    // The caller believes the key is absent, but it exists: no waiting.
    let t = Instant::now();
    let got = ok(s, "watch stale view", s.watch(&key, None, Duration::from_secs(5)).await);
    assert_eq!(got.map(|kv| kv.mod_revision), Some(r1), "watch with an out-of-date view must return the current state");
    assert!(t.elapsed() < PROMPT, "watch with an out-of-date view must return at once, took {:?}", t.elapsed());

    let writer = {
        let (store, key) = (store.clone(), key.clone());
        tokio::spawn(async move {
            tokio::time::sleep(CHANGE_DELAY).await;
            ok(store.as_ref(), "put", store.put(&key, b"2", None).await)
        })
    };
    let t = Instant::now();
    let got = ok(s, "watch", s.watch(&key, Some(r1), Duration::from_secs(5)).await);
    let took = t.elapsed();
    let r2 = writer.await.expect("writer task");
    let kv = got.unwrap_or_else(|| panic!("[{}] watch returned None after a put", s.describe()));
    assert_eq!((kv.value.as_slice(), kv.mod_revision), (b"2".as_slice(), r2), "watch must return the new state");
    assert!(took < PROMPT, "[{}] watch must return promptly after a change, took {took:?}", s.describe());

    let deleter = {
        let (store, key) = (store.clone(), key.clone());
        tokio::spawn(async move {
            tokio::time::sleep(CHANGE_DELAY).await;
            ok(store.as_ref(), "delete", store.delete(&key, None).await)
        })
    };
    let t = Instant::now();
    let got = ok(s, "watch", s.watch(&key, Some(r2), Duration::from_secs(5)).await);
    let took = t.elapsed();
    assert!(deleter.await.expect("deleter task"));
    assert_eq!(got, None, "watch must report a deleted key as absent");
    assert!(took < PROMPT, "[{}] watch must return promptly after a delete, took {took:?}", s.describe());
}

/// A watch on an unchanged key returns at its timeout with the same state, and writes to
/// other keys do not end it.
pub async fn watch_timeout(store: Arc<dyn Dcs>, prefix: &str) {
    let s = store.as_ref();
    let key = format!("{prefix}watch/quiet");
    let rev = ok(s, "put", s.put(&key, b"1", None).await);
    let noise = {
        let (store, other) = (store.clone(), format!("{prefix}watch/other"));
        tokio::spawn(async move {
            tokio::time::sleep(CHANGE_DELAY).await;
            ok(store.as_ref(), "put other", store.put(&other, b"1", None).await)
        })
    };
    // The watch of an absent key runs at the same time, to keep the check short.
    let absent = format!("{prefix}watch/absent");
    let t = Instant::now();
    let (got, got_absent) =
        tokio::join!(async { (s.watch(&key, Some(rev), WATCH_TIMEOUT).await, t.elapsed()) }, async {
            (s.watch(&absent, None, WATCH_TIMEOUT).await, t.elapsed())
        },);
    noise.await.expect("noise task");
    let (got, took) = (ok(s, "watch", got.0), got.1);
    let kv = got.unwrap_or_else(|| panic!("[{}] watch of an unchanged key returned None", s.describe()));
    assert_eq!((kv.value.as_slice(), kv.mod_revision), (b"1".as_slice(), rev), "watch must return the unchanged state");
    assert!(took >= WATCH_TIMEOUT * 9 / 10, "[{}] watch returned after {took:?}, before its timeout", s.describe());
    assert!(took < WATCH_TIMEOUT + PROMPT, "[{}] watch overran its timeout: {took:?}", s.describe());

    let (got, took) = (ok(s, "watch absent", got_absent.0), got_absent.1);
    assert_eq!(got, None, "[{}] watch of a key that stays absent must return None", s.describe());
    assert!(took >= WATCH_TIMEOUT * 9 / 10, "[{}] watch of an absent key returned early: {took:?}", s.describe());
    assert!(took < WATCH_TIMEOUT + PROMPT, "[{}] watch overran its timeout: {took:?}", s.describe());
}

/// A watch on a TTL key returns (with `None`) soon after the key expires.
pub async fn watch_expiry(store: Arc<dyn Dcs>, prefix: &str) {
    let s = store.as_ref();
    let timing = Timing::of(s);
    let key = format!("{prefix}watch/ttl");
    let rev = ok(s, "put", s.put(&key, b"1", Some(SHORT_TTL)).await);
    let kv = must_get(s, &key).await;
    // The key expires at the latest `ttl_left` after this get returned (plus the store's
    // expiry delay, which `expiry_latency` includes).
    let expires_by = Instant::now() + kv.ttl_left.unwrap_or(timing.short_ttl);
    let timeout = Duration::from_secs(5).max(timing.expiry_limit + PROMPT);
    let got = ok(s, "watch", s.watch(&key, Some(rev), timeout).await);
    let returned = Instant::now();
    assert_eq!(got, None, "[{}] watch must report an expired key as absent", s.describe());
    assert!(
        returned <= expires_by + timing.expiry_latency,
        "[{}] watch noticed the expiry {:?} late (allowed {:?})",
        s.describe(),
        returned.duration_since(expires_by),
        timing.expiry_latency
    );
}

/// A watch on an absent key (`known: None`) returns when the key is created.
pub async fn watch_absent_until_created(store: Arc<dyn Dcs>, prefix: &str) {
    let s = store.as_ref();
    let key = format!("{prefix}watch/created");
    let creator = {
        let (store, key) = (store.clone(), key.clone());
        tokio::spawn(async move {
            tokio::time::sleep(CHANGE_DELAY).await;
            ok(store.as_ref(), "create", store.create(&key, b"1", None).await)
        })
    };
    let t = Instant::now();
    let got = ok(s, "watch", s.watch(&key, None, Duration::from_secs(5)).await);
    let took = t.elapsed();
    let rev = creator.await.expect("creator task").expect("create of a fresh key must succeed");
    let kv = got.unwrap_or_else(|| panic!("[{}] watch of an absent key returned None after create", s.describe()));
    assert_eq!(kv.mod_revision, rev, "watch must return the created key");
    assert!(took < PROMPT, "[{}] watch must return promptly after a create, took {took:?}", s.describe());
}

/// Leader terms: the first leader gets term 1, the next (after release) term 2; renew works
/// with the current revision only; release needs the current revision; watch_leader sees the
/// release.
pub async fn cluster_leader_terms(store: Arc<dyn Dcs>, prefix: &str) {
    let s = store.clone();
    let d = store.describe();
    let cs = ClusterStore::new(store, &cluster_name(prefix, "terms"));

    let (l1, rev1) = ok(s.as_ref(), "acquire", cs.acquire_leader("a", LONG_TTL).await).expect("first acquire must win");
    assert_eq!((l1.holder.as_str(), l1.term), ("a", 1), "[{d}] the first leader must get term 1");
    assert!(
        ok(s.as_ref(), "acquire held", cs.acquire_leader("b", LONG_TTL).await).is_none(),
        "[{d}] leader key is held"
    );

    let snap = ok(s.as_ref(), "load", cs.load().await);
    let leader = snap.leader.clone().expect("leader in snapshot");
    assert_eq!((leader.value, leader.revision), (l1.clone(), rev1));
    if s.ttl_precision().ttl_left_in_list {
        assert!(leader.ttl_left.is_some(), "[{d}] the leader key has a TTL");
    } else {
        // This store reports `ttl_left` only per key (see `TtlPrecision::ttl_left_in_list`).
        let kv = must_get(s.as_ref(), &cs.key("leader")).await;
        assert!(kv.ttl_left.is_some(), "[{d}] the leader key has a TTL");
    }
    assert_eq!(snap.term.as_ref().map(|t| t.value), Some(1));
    assert_eq!(snap.newest_term(), 1);

    let rev2 =
        ok(s.as_ref(), "renew", cs.renew_leader(&l1, rev1, LONG_TTL).await).expect("renew with current revision");
    assert!(rev2 > rev1);
    assert_eq!(ok(s.as_ref(), "stale renew", cs.renew_leader(&l1, rev1, LONG_TTL).await), None, "[{d}] stale renew");
    assert!(!ok(s.as_ref(), "stale release", cs.release_leader(rev1).await), "[{d}] release with a stale revision");
    assert!(ok(s.as_ref(), "load", cs.load().await).leader.is_some(), "a failed release must keep the leader");

    let watcher = {
        let cs = cs.clone();
        tokio::spawn(async move { cs.watch_leader(Some(rev2), Duration::from_secs(5)).await })
    };
    tokio::time::sleep(CHANGE_DELAY).await;
    assert!(ok(s.as_ref(), "release", cs.release_leader(rev2).await), "[{d}] release with the current revision");
    let watched = ok(s.as_ref(), "watch_leader", watcher.await.expect("watcher task"));
    assert_eq!(watched, None, "watch_leader must see the release");
    assert!(ok(s.as_ref(), "load", cs.load().await).leader.is_none());

    let (l2, _) = ok(s.as_ref(), "acquire", cs.acquire_leader("b", LONG_TTL).await).expect("acquire after release");
    assert_eq!((l2.holder.as_str(), l2.term), ("b", 2), "[{d}] the next leader must get term 2");
}

/// A leader key that is not renewed expires; the next leader gets a higher term and the old
/// holder can no longer renew.
pub async fn cluster_leader_expiry(store: Arc<dyn Dcs>, prefix: &str) {
    let s = store.clone();
    let d = store.describe();
    let cs = ClusterStore::new(store, &cluster_name(prefix, "expiry"));
    let timing = Timing::of(s.as_ref());
    let start = Instant::now();
    let (l1, rev1) = ok(s.as_ref(), "acquire", cs.acquire_leader("a", SHORT_TTL).await).expect("first acquire");
    wait_until_absent(s.as_ref(), &cs.key("leader"), timing.short_ttl, start, timing.expiry_limit).await;
    assert!(ok(s.as_ref(), "load", cs.load().await).leader.is_none(), "[{d}] an expired leader key must not load");
    assert_eq!(
        ok(s.as_ref(), "renew expired", cs.renew_leader(&l1, rev1, SHORT_TTL).await),
        None,
        "[{d}] renew after expiry"
    );
    let (l2, _) = ok(s.as_ref(), "acquire", cs.acquire_leader("b", LONG_TTL).await).expect("acquire after expiry");
    assert!(l2.term > l1.term, "[{d}] terms must grow: {} then {}", l1.term, l2.term);
}

/// Five members race for the leader key: exactly one wins, and the snapshot shows it.
pub async fn cluster_concurrent_acquire(store: Arc<dyn Dcs>, prefix: &str) {
    let s = store.clone();
    let cs = ClusterStore::new(store, &cluster_name(prefix, "race"));
    let results = race(5, |i| {
        let (cs, s) = (cs.clone(), s.clone());
        async move { ok(s.as_ref(), "racing acquire", cs.acquire_leader(&format!("m{i}"), LONG_TTL).await) }
    })
    .await;
    let (winner, (leader, rev)) = exactly_one(s.as_ref(), "concurrent acquire_leader", &results);
    assert_eq!(leader.holder, format!("m{winner}"));
    let snap = ok(s.as_ref(), "load", cs.load().await);
    let loaded = snap.leader.clone().expect("leader in snapshot");
    assert_eq!((loaded.value, loaded.revision), (leader.clone(), rev), "the snapshot must show the winner");
    assert!(snap.newest_term() >= leader.term);
}

fn member(name: &str) -> MemberValue {
    MemberValue {
        name: name.to_string(),
        api_url: format!("http://127.0.0.1:8008/{name}"),
        pg_address: "127.0.0.1:5432".to_string(),
        role: Role::Replica,
        state: "running".to_string(),
        timeline: Some(1),
        lsn: Some(100),
        replayed_lsn: Some(90),
        replay_lag_ms: Some(7),
        streaming: true,
        following: Some("a".to_string()),
        term: 1,
        tags: MemberTags { nofailover: false, failover_priority: 1 },
        pending_restart: false,
        version: "test".to_string(),
    }
}

fn history(term: u64) -> HistoryEntry {
    HistoryEntry {
        term,
        timeline: u32::try_from(term).unwrap_or(u32::MAX).saturating_add(1),
        time_ms: 1_700_000_000_000 + term,
        reason: "failover".to_string(),
        old_primary: Some("a".to_string()),
        new_primary: "b".to_string(),
        old_primary_lsn: Some(term * 10),
        lsn: term * 10 + 1,
        timeline_history: None,
    }
}

/// `ClusterStore::load` returns everything written through the typed operations: leader,
/// members (sorted, undecodable ones skipped), config (create, then CAS with conflict
/// detection), initialize (claimed exactly once), failover, status and history (by term).
pub async fn cluster_load(store: Arc<dyn Dcs>, prefix: &str) {
    let s = store.clone();
    let d = store.describe();
    let cs = ClusterStore::new(store, &cluster_name(prefix, "load"));
    let load = || async { ok(s.as_ref(), "load", cs.load().await) };

    let snap = load().await;
    assert!(snap.leader.is_none() && snap.term.is_none() && snap.config.is_none() && snap.initialize.is_none());
    assert!(snap.members.is_empty() && snap.history.is_empty() && snap.failover.is_none() && snap.status.is_none());
    assert_eq!(snap.newest_term(), 0);

    // Members: sorted by name, undecodable records skipped, deletable.
    ok(s.as_ref(), "put_member", cs.put_member(&member("b"), LONG_TTL).await);
    ok(s.as_ref(), "put_member", cs.put_member(&member("a"), LONG_TTL).await);
    ok(s.as_ref(), "put garbage member", s.put(&cs.key("members/zz"), b"not json", Some(LONG_TTL)).await);
    let snap = load().await;
    let names: Vec<&str> = snap.members.iter().map(|m| m.value.name.as_str()).collect();
    assert_eq!(names, ["a", "b"], "[{d}] members must be sorted and undecodable ones skipped");
    assert_eq!(snap.member("b"), Some(&member("b")));
    if s.ttl_precision().ttl_left_in_list {
        assert!(snap.members[0].ttl_left.is_some(), "[{d}] member records have a TTL");
    } else {
        // This store reports `ttl_left` only per key (see `TtlPrecision::ttl_left_in_list`).
        let kv = must_get(s.as_ref(), &cs.key("members/a")).await;
        assert!(kv.ttl_left.is_some(), "[{d}] member records have a TTL");
    }
    assert!(ok(s.as_ref(), "delete_member", cs.delete_member("b").await));
    assert!(load().await.member("b").is_none(), "a deleted member must not load");

    // Config: create once, then compare-and-set with conflict detection.
    let c1 = serde_json::json!({"ttl": 30, "loop_wait": 10});
    let c2 = serde_json::json!({"ttl": 20, "loop_wait": 5});
    let r1 = ok(s.as_ref(), "write_config", cs.write_config(&c1, None).await).expect("first config write");
    assert_eq!(ok(s.as_ref(), "write_config", cs.write_config(&c2, None).await), None, "[{d}] config create twice");
    let r2 = ok(s.as_ref(), "write_config", cs.write_config(&c2, Some(r1)).await).expect("config cas");
    assert_eq!(ok(s.as_ref(), "write_config", cs.write_config(&c1, Some(r1)).await), None, "[{d}] stale config cas");
    let config = load().await.config.expect("config in snapshot");
    assert_eq!((config.value, config.revision), (c2, r2));

    // Initialize: exactly one of several racers claims it.
    let claims = race(5, |i| {
        let (cs, s) = (cs.clone(), s.clone());
        async move {
            let value = InitializeValue { bootstrapper: format!("m{i}"), sysid: None, replication_password: None };
            ok(s.as_ref(), "claim_initialize", cs.claim_initialize(&value).await).then_some(i)
        }
    })
    .await;
    let (winner, _) = exactly_one(s.as_ref(), "concurrent claim_initialize", &claims);
    let init = load().await.initialize.expect("initialize in snapshot").value;
    assert_eq!(init.bootstrapper, format!("m{winner}"));
    let with_sysid = InitializeValue { sysid: Some("7300000000000000001".to_string()), ..init };
    ok(s.as_ref(), "set_initialize", cs.set_initialize(&with_sysid).await);
    assert_eq!(load().await.initialize.map(|v| v.value), Some(with_sysid.clone()));
    assert!(ok(s.as_ref(), "delete_initialize", cs.delete_initialize().await));
    assert!(ok(s.as_ref(), "claim_initialize", cs.claim_initialize(&with_sysid).await), "claim after delete");

    // Failover request.
    let failover = FailoverValue {
        kind: "switchover".to_string(),
        leader: Some("a".to_string()),
        candidate: None,
        requested_at_ms: 42,
    };
    ok(s.as_ref(), "set_failover", cs.set_failover(&failover, LONG_TTL).await);
    assert_eq!(load().await.failover.map(|v| v.value), Some(failover));
    assert!(ok(s.as_ref(), "clear_failover", cs.clear_failover().await));
    assert!(load().await.failover.is_none());

    // Switchover announcement and proxy registrations.
    let sw = SwitchoverValue {
        id: "3-42".to_string(),
        leader: "a".to_string(),
        term: 3,
        candidate: Some("b".to_string()),
        deadline_ms: 99,
    };
    ok(s.as_ref(), "set_switchover", cs.set_switchover(&sw, LONG_TTL).await);
    let loaded = ok(s.as_ref(), "get_switchover", cs.get_switchover().await).expect("switchover");
    assert_eq!(loaded.value, sw);
    assert_eq!(load().await.switchover.map(|v| v.value), Some(sw.clone()));
    let seen = ok(s.as_ref(), "watch_switchover", cs.watch_switchover(None, Duration::from_secs(2)).await);
    assert_eq!(seen.map(|v| v.value), Some(sw), "[{d}] a watch from absent sees the announcement at once");
    assert!(ok(s.as_ref(), "clear_switchover", cs.clear_switchover().await));
    assert!(load().await.switchover.is_none());
    let proxy = |id: &str, drained: Option<&str>| ProxyValue {
        id: id.to_string(),
        address: "127.0.0.1:6432".to_string(),
        drained: drained.map(str::to_string),
        version: "test".to_string(),
    };
    ok(s.as_ref(), "put_proxy", cs.put_proxy(&proxy("p2", None), LONG_TTL).await);
    ok(s.as_ref(), "put_proxy", cs.put_proxy(&proxy("p1", Some("3-42")), LONG_TTL).await);
    let ids: Vec<String> = ok(s.as_ref(), "proxies", cs.proxies().await).into_iter().map(|p| p.value.id).collect();
    assert_eq!(ids, ["p1", "p2"], "[{d}] proxies are listed sorted by id");
    assert_eq!(load().await.proxies.first().map(|p| p.value.clone()), Some(proxy("p1", Some("3-42"))));
    assert!(ok(s.as_ref(), "delete_proxy", cs.delete_proxy("p1").await));
    assert!(ok(s.as_ref(), "delete_proxy", cs.delete_proxy("p2").await));
    assert!(ok(s.as_ref(), "proxies", cs.proxies().await).is_empty());

    // Status.
    let status = StatusValue { last_lsn: 1234, term: 3, timeline: 2, updated_ms: 99, last_archived_ms: Some(98) };
    ok(s.as_ref(), "set_status", cs.set_status(&status).await);
    assert_eq!(load().await.status, Some(status));

    // History, sorted by term whatever the write order.
    for term in [2, 10, 1] {
        ok(s.as_ref(), "append_history", cs.append_history(&history(term)).await);
    }
    let snap = load().await;
    let terms: Vec<u64> = snap.history.iter().map(|h| h.term).collect();
    assert_eq!(terms, [1, 2, 10], "[{d}] history must be sorted by term");
    assert_eq!(snap.history[2], history(10));

    // Leader and term.
    let (leader, rev) = ok(s.as_ref(), "acquire", cs.acquire_leader("a", LONG_TTL).await).expect("acquire");
    let snap = load().await;
    let loaded = snap.leader.clone().expect("leader in snapshot");
    assert_eq!((loaded.value, loaded.revision), (leader.clone(), rev));
    assert_eq!(snap.leader_name(), Some("a"));
    assert_eq!(snap.term.as_ref().map(|t| t.value), Some(leader.term));
    assert_eq!(snap.newest_term(), 10, "newest_term must include history");
}
