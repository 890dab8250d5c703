//! A small worker pool for file copies: `jobs` threads take items in order from a shared
//! index; the first error stops the others from starting new items.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Runs `f` on every item with up to `jobs` threads and returns the results in item order,
/// or the first error (items not yet started are then skipped).
pub fn try_for_each<T, R, E, F>(items: &[T], jobs: usize, f: F) -> Result<Vec<R>, E>
where
    T: Sync,
    R: Send,
    E: Send,
    F: Fn(&T) -> Result<R, E> + Sync,
{
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    let first_error: Mutex<Option<E>> = Mutex::new(None);
    let jobs = jobs.clamp(1, items.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { return };
                match f(item) {
                    Ok(r) => {
                        if let Ok(mut v) = results.lock() {
                            v[i] = Some(r);
                        }
                    }
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        if let Ok(mut slot) = first_error.lock() {
                            slot.get_or_insert(e);
                        }
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(results.into_inner().unwrap_or_else(|p| p.into_inner()).into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_in_order_and_first_error() {
        let items: Vec<u32> = (0..100).collect();
        let r: Result<Vec<u32>, String> = try_for_each(&items, 4, |i| Ok(i * 2));
        assert_eq!(r.unwrap(), items.iter().map(|i| i * 2).collect::<Vec<_>>());
        let r: Result<Vec<u32>, String> =
            try_for_each(&items, 3, |i| if *i == 50 { Err(format!("bad {i}")) } else { Ok(*i) });
        assert_eq!(r.unwrap_err(), "bad 50");
        let empty: Vec<u32> = Vec::new();
        assert!(try_for_each(&empty, 4, |i: &u32| Ok::<_, String>(*i)).unwrap().is_empty());
    }
}
