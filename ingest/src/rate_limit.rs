//! Per-tenant rate limits: one token bucket per tenant, refilled at `rate` events per second up to
//! `burst`. A request is let through while its tenant's bucket is not empty and takes one token per
//! event (a batch may drive the bucket below zero; the tenant then waits until it refills), so a
//! batch larger than the burst is still possible and the long-run rate is exact.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The per-tenant token buckets of one ingest instance.
#[derive(Debug)]
pub struct TenantRateLimit {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl TenantRateLimit {
    /// `rate` events per second per tenant, `burst` events at once. `None` when `rate` is 0
    /// (no limit).
    pub fn new(rate: f64, burst: f64) -> Option<Self> {
        (rate > 0.0).then(|| Self {
            rate,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Takes `events` tokens from `tenant`'s bucket, or says how long to wait before retrying.
    pub fn take(&self, tenant: &str, events: usize) -> Result<(), Duration> {
        self.take_at(tenant, events, Instant::now())
    }

    fn take_at(&self, tenant: &str, events: usize, now: Instant) -> Result<(), Duration> {
        let mut buckets = match self.buckets.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        let bucket = buckets.entry(tenant.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens <= 0.0 {
            // Time until the bucket holds one token again.
            return Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate));
        }
        bucket.tokens -= events as f64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_rate_means_no_limit() {
        assert!(TenantRateLimit::new(0.0, 100.0).is_none());
    }

    #[test]
    fn burst_then_refill_at_rate() {
        let limit = TenantRateLimit::new(100.0, 50.0).unwrap();
        let t0 = Instant::now();
        assert!(limit.take_at("a", 30, t0).is_ok());
        assert!(limit.take_at("a", 20, t0).is_ok());
        let wait = limit.take_at("a", 1, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(10), "one token at 100/s");
        // 100 ms later: 10 tokens back.
        let t1 = t0 + Duration::from_millis(100);
        assert!(limit.take_at("a", 10, t1).is_ok());
        assert!(limit.take_at("a", 1, t1).is_err());
    }

    #[test]
    fn tenants_do_not_share_a_bucket() {
        let limit = TenantRateLimit::new(10.0, 10.0).unwrap();
        let t0 = Instant::now();
        assert!(limit.take_at("a", 10, t0).is_ok());
        assert!(limit.take_at("a", 1, t0).is_err());
        assert!(limit.take_at("b", 10, t0).is_ok());
    }

    #[test]
    fn a_batch_larger_than_the_burst_passes_then_pays_its_debt() {
        let limit = TenantRateLimit::new(100.0, 50.0).unwrap();
        let t0 = Instant::now();
        assert!(limit.take_at("a", 250, t0).is_ok());
        // 200 tokens in debt: 2.01 s until one token is back.
        let wait = limit.take_at("a", 1, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 2.01).abs() < 1e-9, "{wait:?}");
        assert!(
            limit
                .take_at("a", 1, t0 + Duration::from_millis(2020))
                .is_ok()
        );
    }

    #[test]
    fn refill_never_exceeds_the_burst() {
        let limit = TenantRateLimit::new(1000.0, 5.0).unwrap();
        let t0 = Instant::now();
        assert!(limit.take_at("a", 1, t0).is_ok());
        let later = t0 + Duration::from_secs(60);
        assert!(limit.take_at("a", 5, later).is_ok());
        assert!(limit.take_at("a", 1, later).is_err());
    }
}
