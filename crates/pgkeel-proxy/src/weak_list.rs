//! A list of `Weak` references to things that end on their own (sessions, server
//! connections), for iterating over the live ones.

use std::sync::{Arc, Weak};

/// Entries of ended things are dropped when the list has doubled since the last time, so
/// dropping them costs O(1) per push.
#[derive(Debug)]
pub struct WeakList<T> {
    list: Vec<Weak<T>>,
    prune_at: usize,
}

impl<T> Default for WeakList<T> {
    fn default() -> Self {
        WeakList { list: Vec::new(), prune_at: 0 }
    }
}

impl<T> WeakList<T> {
    pub fn push(&mut self, item: &Arc<T>) {
        if self.list.len() >= self.prune_at.max(64) {
            self.list.retain(|w| w.strong_count() > 0);
            self.prune_at = 2 * self.list.len();
        }
        self.list.push(Arc::downgrade(item));
    }

    /// The entries still alive.
    pub fn live(&self) -> impl Iterator<Item = Arc<T>> + '_ {
        self.list.iter().filter_map(Weak::upgrade)
    }

    /// Entries held, ended ones included (tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.list.len()
    }
}
