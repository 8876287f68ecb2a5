//! Event-id dedup over a time horizon, per raw partition.
//!
//! A key is (tenant, device, event id). Time is the envelope's `received_at`, never the wall clock,
//! so replaying the same raw records gives the same decisions: that is what lets a restarted stage
//! rebuild this state by re-reading the horizon before its committed offset.
//!
//! Memory: one entry per distinct event inside the horizon, about 100 bytes plus the key's length.

use std::collections::{HashMap, VecDeque};

use tributary_schemas::Micros;

/// The events seen in one partition within the horizon.
#[derive(Debug, Clone)]
pub struct DedupWindow {
    horizon: Micros,
    seen: HashMap<String, Micros>,
    order: VecDeque<(Micros, String)>,
}

impl DedupWindow {
    pub fn new(horizon: Micros) -> Self {
        Self {
            horizon,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn key(tenant: &str, device: &str, event_id: &str) -> String {
        let mut k = String::with_capacity(tenant.len() + device.len() + event_id.len() + 2);
        k.push_str(tenant);
        k.push('\u{1f}');
        k.push_str(device);
        k.push('\u{1f}');
        k.push_str(event_id);
        k
    }

    /// Records the event; `true` when it was already seen within the horizon (a duplicate).
    pub fn check_and_insert(
        &mut self,
        tenant: &str,
        device: &str,
        event_id: &str,
        at: Micros,
    ) -> bool {
        self.expire(at);
        let key = Self::key(tenant, device, event_id);
        if self.seen.contains_key(&key) {
            return true;
        }
        self.seen.insert(key.clone(), at);
        self.order.push_back((at, key));
        false
    }

    fn expire(&mut self, now: Micros) {
        let cutoff = now.saturating_sub(self.horizon);
        while let Some((at, _)) = self.order.front() {
            if *at >= cutoff {
                break;
            }
            if let Some((at, key)) = self.order.pop_front()
                && self.seen.get(&key) == Some(&at)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_within_horizon_only() {
        let mut w = DedupWindow::new(10);
        assert!(!w.check_and_insert("t", "d", "e1", 100));
        assert!(w.check_and_insert("t", "d", "e1", 105));
        assert!(
            !w.check_and_insert("t", "d2", "e1", 105),
            "other device, other key"
        );
        assert!(
            !w.check_and_insert("t", "d", "e1", 111),
            "expired after the horizon"
        );
        assert_eq!(w.len(), 2);
    }
}
