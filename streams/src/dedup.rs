//! Event-id dedup over a time horizon, per raw partition.
//!
//! A key is (tenant, device, event id), kept as its 128-bit XXH3 hash (a false match needs ~2⁶⁴
//! events in one window). Time is the raw record's dedup clock (when it was written to `raw`:
//! `received_at`, or `replayed_at` for a replay), never the wall clock, so replaying the same raw
//! records gives the same decisions: that is what lets a restarted stage rebuild this state by
//! re-reading the horizon before its committed offset.
//!
//! Each entry also remembers which of the message's measurements were rejected, so a replay of a
//! dead-lettered message re-drives only those (and a second replay none).
//!
//! Memory: about 95 bytes per distinct message inside the horizon ([`DedupWindow::approx_bytes`],
//! measured by `cargo bench --bench cleanse`); a device sending one message a minute costs ≈ 134 KB
//! over the default 24 h horizon. The window
//! holds at most `max_entries` messages; beyond that the oldest are forgotten early (counted in
//! [`DedupWindow::evicted_early`] and logged: duplicates older than that are no longer caught).

use std::collections::{HashMap, VecDeque};

use tributary_schemas::Micros;

/// A message's dedup key.
pub type Key = u128;

/// Every measurement (or the whole message) rejected.
pub const ALL: u64 = u64::MAX;

/// The bit of measurement `index` in a rejected mask (the 64th and later share the last bit).
pub fn bit(index: usize) -> u64 {
    1 << index.min(63)
}

/// The key of (tenant, device, event id).
pub fn key(tenant: &str, device: &str, event_id: &str) -> Key {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(tenant.as_bytes());
    h.update(&[0x1f]);
    h.update(device.as_bytes());
    h.update(&[0x1f]);
    h.update(event_id.as_bytes());
    h.digest128()
}

/// What the window remembers of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub at: Micros,
    /// Measurements that were rejected ([`bit`]); [`ALL`] when the whole message was.
    pub rejected: u64,
}

/// The messages seen in one partition within the horizon.
#[derive(Debug, Clone)]
pub struct DedupWindow {
    horizon: Micros,
    max_entries: usize,
    seen: HashMap<Key, Seen>,
    order: VecDeque<(Micros, Key)>,
    /// Entries forgotten before the horizon because the window was full.
    pub evicted_early: u64,
}

impl DedupWindow {
    pub fn new(horizon: Micros, max_entries: usize) -> Self {
        Self {
            horizon,
            max_entries: max_entries.max(1),
            seen: HashMap::new(),
            order: VecDeque::new(),
            evicted_early: 0,
        }
    }

    /// What is known of `key`, after forgetting what is older than the horizon at `now`.
    pub fn get(&mut self, key: Key, now: Micros) -> Option<Seen> {
        self.expire(now);
        self.seen.get(&key).copied()
    }

    /// Records (or updates) `key` as seen at `at` with its rejected measurements.
    pub fn record(&mut self, key: Key, at: Micros, rejected: u64) {
        let previous = self.seen.insert(key, Seen { at, rejected });
        if previous.is_none_or(|p| p.at != at) {
            self.order.push_back((at, key));
        }
        while self.seen.len() > self.max_entries {
            let Some((at, key)) = self.order.pop_front() else {
                break;
            };
            if self.seen.get(&key).is_some_and(|s| s.at == at) {
                self.seen.remove(&key);
                self.evicted_early += 1;
            }
        }
    }

    fn expire(&mut self, now: Micros) {
        let cutoff = now.saturating_sub(self.horizon);
        while let Some((at, _)) = self.order.front() {
            if *at >= cutoff {
                break;
            }
            if let Some((at, key)) = self.order.pop_front()
                && self.seen.get(&key).is_some_and(|s| s.at == at)
            {
                self.seen.remove(&key);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Approximate heap bytes held (hash table slots with their control bytes, and the queue).
    pub fn approx_bytes(&self) -> usize {
        let slot = std::mem::size_of::<(Key, Seen)>() + 1;
        let queued = std::mem::size_of::<(Micros, Key)>();
        self.seen.capacity() * slot + self.order.capacity() * queued
    }
}

/// The value accepted per (tenant, device, metric, event time) within a horizon: what tells a
/// conflicting reading (another value for the same instant) from a duplicate one (the same value
/// again, under another event id). About 95 bytes per reading inside the horizon, like
/// [`DedupWindow`], on whose bounded window it is built.
#[derive(Debug, Clone)]
pub struct ReadingWindow(DedupWindow);

impl ReadingWindow {
    pub fn new(horizon: Micros, max_entries: usize) -> Self {
        Self(DedupWindow::new(horizon, max_entries))
    }

    /// The key of (tenant, device, metric, event time).
    pub fn key(tenant: &str, device: &str, metric: &str, event_time: Micros) -> Key {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for part in [tenant, device, metric] {
            h.update(part.as_bytes());
            h.update(&[0x1f]);
        }
        h.update(&event_time.to_le_bytes());
        h.digest128()
    }

    /// The value accepted for `key`, if one was within the horizon at `now`.
    pub fn get(&mut self, key: Key, now: Micros) -> Option<f64> {
        self.0.get(key, now).map(|s| f64::from_bits(s.rejected))
    }

    /// Records the value accepted for `key` at `now`.
    pub fn record(&mut self, key: Key, now: Micros, value: f64) {
        self.0.record(key, now, value.to_bits());
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn approx_bytes(&self) -> usize {
        self.0.approx_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_within_horizon_only() {
        let mut w = DedupWindow::new(10, 100);
        let (a, b) = (key("t", "d", "e1"), key("t", "d2", "e1"));
        assert_ne!(a, b, "other device, other key");
        assert_ne!(
            key("t", "d", "e1"),
            key("t", "de", "1"),
            "fields are separated"
        );
        assert_eq!(w.get(a, 100), None);
        w.record(a, 100, 0);
        assert_eq!(w.get(a, 105).map(|s| s.at), Some(100));
        assert_eq!(w.get(b, 105), None);
        assert_eq!(w.get(a, 111), None, "expired after the horizon");
        assert!(w.is_empty());
    }

    #[test]
    fn updates_keep_the_latest_rejections() {
        let mut w = DedupWindow::new(10, 100);
        let k = key("t", "d", "e");
        w.record(k, 100, bit(1) | bit(2));
        w.record(k, 104, bit(2));
        assert_eq!(
            w.get(k, 110),
            Some(Seen {
                at: 104,
                rejected: bit(2)
            }),
            "the update's time counts, not the first sighting's"
        );
        assert_eq!(w.len(), 1);
        assert_eq!(bit(70), bit(63));
    }

    #[test]
    fn reading_window_keeps_values_per_instant() {
        let mut w = ReadingWindow::new(10, 100);
        let k = ReadingWindow::key("t", "d", "temp", 5);
        assert_ne!(k, ReadingWindow::key("t", "d", "temp", 6));
        assert_ne!(k, ReadingWindow::key("t", "d", "temp2", 5));
        assert_eq!(w.get(k, 100), None);
        w.record(k, 100, -0.5);
        assert_eq!(w.get(k, 101), Some(-0.5));
        assert_eq!(w.get(k, 111), None, "forgotten after the horizon");
    }

    #[test]
    fn a_full_window_forgets_the_oldest_and_counts_it() {
        let mut w = DedupWindow::new(1_000, 2);
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            w.record(key("t", "d", id), i as Micros, 0);
        }
        assert_eq!(w.len(), 2);
        assert_eq!(w.evicted_early, 1);
        assert_eq!(w.get(key("t", "d", "a"), 3), None);
        assert!(w.get(key("t", "d", "c"), 3).is_some());
        assert!(w.approx_bytes() > 0);
    }
}
