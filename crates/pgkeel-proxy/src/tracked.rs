//! The session settings the proxy carries for a client from one server connection to the
//! next ([`TRACKED`]): what the client asked for and what it was told in ParameterStatus.
//!
//! Every client keeps two of these for as long as it is connected, so they are small: a list
//! of (setting, value), shared copy-on-write. A client told exactly the pool's login
//! parameters shares the pool's list; one that changed a setting has its own list whose
//! values are still mostly the pool's (`Arc<str>`). An idle client's settings then cost a
//! pointer or a few words each, not a map of strings (docs/benchmarks.md, "Proxy": 2,000
//! idle clients).

use std::sync::Arc;

/// Session settings the proxy replays on each server connection a client uses, with their
/// canonical spelling. Others in a startup packet are refused: they would silently apply to
/// one server connection only.
pub const TRACKED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "extra_float_digits",
    "search_path",
    "standard_conforming_strings",
];

/// Tracked settings the server does not report with ParameterStatus (before PostgreSQL 18
/// for search_path): after DISCARD ALL their value is unknown.
pub const UNREPORTED: &[&str] = &["extra_float_digits", "search_path"];

/// (index in [`TRACKED`], value).
type Entry = (u8, Arc<str>);

/// A server connection's run-time parameters by name, with the [`TRACKED`] ones also by
/// index: a client takes a connection in every transaction, and comparing its settings
/// ([`Tracked::differing`]) then needs no hashing of names.
///
/// `repr(C)`: `matched`, which every transaction reads, comes first (see
/// [`crate::server::ServerConn`]).
#[derive(Debug, Default)]
#[repr(C)]
pub struct Params {
    /// A list of settings these were found to have, all of them ([`Tracked::matched_by`]),
    /// until one of the tracked settings changes.
    matched: Tracked,
    map: std::collections::HashMap<String, String>,
    tracked: [Option<Box<str>>; TRACKED.len()],
}

impl Params {
    pub fn insert(&mut self, name: String, value: String) {
        if let Some(i) = Tracked::index(&name) {
            self.tracked[usize::from(i)] = Some(value.as_str().into());
            self.matched = Tracked::default();
        }
        self.map.insert(name, value);
    }

    pub fn remove(&mut self, name: &str) {
        if let Some(i) = Tracked::index(name) {
            self.tracked[usize::from(i)] = None;
            self.matched = Tracked::default();
        }
        self.map.remove(name);
    }
}

impl std::ops::Deref for Params {
    type Target = std::collections::HashMap<String, String>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

/// Values of some of the [`TRACKED`] settings, at most one per setting. Cloning shares the
/// list; the first change after a clone copies it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracked(Option<Arc<Vec<Entry>>>);

impl Tracked {
    /// The canonical name of a tracked setting, `None` for any other name.
    pub fn canonical(name: &str) -> Option<&'static str> {
        TRACKED.iter().copied().find(|t| *t == name)
    }

    fn index(name: &str) -> Option<u8> {
        TRACKED.iter().position(|t| *t == name).and_then(|i| u8::try_from(i).ok())
    }

    /// The value of `name`, if set.
    #[cfg(test)]
    pub fn get(&self, name: &str) -> Option<&str> {
        let i = Self::index(name)?;
        self.entries().iter().find(|(k, _)| *k == i).map(|(_, v)| &**v)
    }

    /// Sets `name` (a tracked setting, else nothing happens) to `value`. Returns whether the
    /// value changed.
    pub fn set(&mut self, name: &str, value: &str) -> bool {
        self.set_shared(name, value, None)
    }

    /// As [`Tracked::set`], reusing `shared` for the value when it holds the same text (one
    /// allocation fewer per client for the common values).
    pub fn set_shared(&mut self, name: &str, value: &str, shared: Option<&Arc<str>>) -> bool {
        let Some(i) = Self::index(name) else { return false };
        let make = || shared.filter(|s| ***s == *value).cloned().unwrap_or_else(|| Arc::from(value));
        let at = self.entries().iter().position(|(k, _)| *k == i);
        if at.is_some_and(|at| *self.entries()[at].1 == *value) {
            return false;
        }
        let list = Arc::make_mut(self.0.get_or_insert_with(Default::default));
        match at {
            Some(at) => list[at].1 = make(),
            None => list.push((i, make())),
        }
        true
    }

    /// (canonical name, value) of every setting set.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> + '_ {
        self.entries().iter().map(|(k, v)| (TRACKED[usize::from(*k)], &**v))
    }

    /// The settings whose value in `params` (a server connection's) is another or missing:
    /// what must be set on that connection before the client uses it.
    pub fn differing<'a>(&'a self, params: &'a Params) -> impl Iterator<Item = (&'static str, &'a str)> + 'a {
        self.entries()
            .iter()
            .filter(|(k, v)| params.tracked[usize::from(*k)].as_deref() != Some(&**v))
            .map(|(k, v)| (TRACKED[usize::from(*k)], &**v))
    }

    /// Whether `params` has every one of these settings ([`Tracked::differing`] finds
    /// none). A match is remembered in `params` until one of its tracked settings changes:
    /// a client takes a server connection in every transaction, and one whose list is
    /// shared with the pool's other clients ([`Tracked::share`]) then checks a connection
    /// by pointer, without reading the values (each its own allocation, seldom in the
    /// cache by then).
    pub fn matched_by(&self, params: &mut Params) -> bool {
        let Some(list) = &self.0 else { return true };
        if params.matched.0.as_ref().is_some_and(|m| Arc::ptr_eq(m, list)) {
            return true;
        }
        if self.differing(params).next().is_some() {
            return false;
        }
        params.matched = self.clone();
        true
    }

    /// Takes the list of one of `kept` with the same settings, or adds this one to them
    /// (up to `max` lists): clients that logged in with the same settings share one.
    pub fn share(&mut self, kept: &mut Vec<Tracked>, max: usize) {
        if self.0.is_none() {
            return;
        }
        match kept.iter().find(|k| *k == self) {
            Some(k) => *self = k.clone(),
            None if kept.len() < max => kept.push(self.clone()),
            None => {}
        }
    }

    fn entries(&self) -> &[Entry] {
        self.0.as_deref().map(Vec::as_slice).unwrap_or_default()
    }

    /// Frees spare room in a list of its own (kept for the client's whole connection).
    pub fn shrink_to_fit(&mut self) {
        if let Some(list) = self.0.as_mut().and_then(Arc::get_mut) {
            list.shrink_to_fit();
        }
    }

    /// Whether `self` and `other` share one list (tests).
    #[cfg(test)]
    fn shares_with(&self, other: &Tracked) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_remove_and_sharing() {
        let mut t = Tracked::default();
        assert!(t.set("TimeZone", "UTC"));
        assert!(!t.set("TimeZone", "UTC"), "the same value is no change");
        assert!(t.set("TimeZone", "Europe/Paris"));
        assert_eq!(t.get("TimeZone"), Some("Europe/Paris"));
        // Only tracked settings, in their canonical spelling.
        assert!(!t.set("work_mem", "64MB"));
        assert!(!t.set("timezone", "UTC"));
        assert_eq!(
            (t.get("work_mem"), Tracked::canonical("DateStyle"), Tracked::canonical("datestyle")),
            (None, Some("DateStyle"), None)
        );
        // A shared value is reused when it is the same text, not otherwise.
        let utf8: Arc<str> = Arc::from("UTF8");
        t.set_shared("client_encoding", "UTF8", Some(&utf8));
        assert_eq!(Arc::strong_count(&utf8), 2);
        t.set_shared("application_name", "psql", Some(&utf8));
        assert_eq!((Arc::strong_count(&utf8), t.get("application_name")), (2, Some("psql")));
        let all: Vec<(&str, &str)> = t.iter().collect();
        assert_eq!(all, [("TimeZone", "Europe/Paris"), ("client_encoding", "UTF8"), ("application_name", "psql")]);
        t.set("client_encoding", "LATIN1");
        assert_eq!((Arc::strong_count(&utf8), t.get("client_encoding")), (1, Some("LATIN1")));
        assert_eq!(t.iter().count(), 3);
        // Differences from a server connection's settings.
        let mut params = Params::default();
        params.insert("TimeZone".into(), "Europe/Paris".into());
        params.insert("DateStyle".into(), "ISO".into());
        params.insert("server_version".into(), "15.18".into());
        params.insert("application_name".into(), "pgbench".into());
        let differing: Vec<(&str, &str)> = t.differing(&params).collect();
        assert_eq!(differing, [("client_encoding", "LATIN1"), ("application_name", "psql")]);
        params.insert("application_name".into(), "psql".into());
        params.remove("TimeZone");
        let differing: Vec<(&str, &str)> = t.differing(&params).collect();
        assert_eq!(differing, [("TimeZone", "Europe/Paris"), ("client_encoding", "LATIN1")]);
        assert_eq!((params.get("server_version").map(String::as_str), params.len()), (Some("15.18"), 3));
        // A clone shares the list until one of them changes a value.
        let mut copy = t.clone();
        assert!(copy.shares_with(&t));
        assert!(!copy.set("TimeZone", "Europe/Paris"), "the same value");
        assert!(copy.shares_with(&t));
        assert!(copy.set("TimeZone", "UTC"));
        assert!(!copy.shares_with(&t));
        assert_eq!((t.get("TimeZone"), copy.get("TimeZone")), (Some("Europe/Paris"), Some("UTC")));
        // Every tracked name fits the index.
        for name in TRACKED {
            assert!(t.set(name, "x") || t.get(name) == Some("x"), "{name}");
        }
        assert_eq!(t.iter().count(), TRACKED.len());
    }

    #[test]
    fn a_match_is_remembered_until_a_tracked_setting_changes() {
        let mut params = Params::default();
        params.insert("application_name".into(), "pgbench".into());
        params.insert("TimeZone".into(), "UTC".into());
        let mut client = Tracked::default();
        assert!(client.matched_by(&mut params), "no settings: any connection");
        client.set("application_name", "pgbench");
        assert!(client.matched_by(&mut params));
        assert!(params.matched.shares_with(&client), "remembered");
        assert!(client.matched_by(&mut params));
        // A setting that is not tracked changes nothing; a tracked one forgets the match.
        params.insert("server_version".into(), "15.18".into());
        assert!(params.matched.shares_with(&client));
        params.insert("application_name".into(), "psql".into());
        assert!(params.matched.0.is_none());
        assert!(!client.matched_by(&mut params));
        assert!(params.matched.0.is_none(), "a mismatch is not remembered");
        params.insert("application_name".into(), "pgbench".into());
        assert!(client.matched_by(&mut params));
        params.remove("application_name");
        assert!(!client.matched_by(&mut params));
        // The client's list changed (copied, as the connection kept the old one): checked
        // again, not taken as matched.
        params.insert("application_name".into(), "pgbench".into());
        assert!(client.matched_by(&mut params));
        client.set("TimeZone", "Europe/Paris");
        assert!(!client.matched_by(&mut params));
    }

    #[test]
    fn clients_with_the_same_settings_share_one_list() {
        let mut kept = Vec::new();
        let mut a = Tracked::default();
        a.set("application_name", "pgbench");
        let mut b = Tracked::default();
        b.set("application_name", "pgbench");
        let mut c = Tracked::default();
        c.set("application_name", "psql");
        let mut none = Tracked::default();
        for t in [&mut a, &mut b, &mut c, &mut none] {
            t.share(&mut kept, 2);
        }
        assert!(a.shares_with(&b));
        assert!(!a.shares_with(&c));
        assert_eq!(kept.len(), 2, "one list per distinct settings, none for no settings");
        let mut d = Tracked::default();
        d.set("application_name", "other");
        d.share(&mut kept, 2);
        assert_eq!(kept.len(), 2, "at most max lists are kept");
        assert_eq!(d.get("application_name"), Some("other"));
    }
}
