//! The event-time clock of a stateful stage's partitions: what makes timers (a missing heartbeat,
//! a quiet period) fire deterministically.
//!
//! Each partition's clock is its event-time watermark (the newest event time seen) less a grace
//! (records of other keys may be this late). Every time it crosses a multiple of the sweep
//! interval, at that record, the stage sweeps the partition's state: the same records give the
//! same sweeps, so a replay gives the same outputs. When the stage is caught up and a partition is
//! quiet, its clock goes on by the wall time passed since its newest record was written to the
//! input topic (the record's Kafka timestamp), at most one sweep per interval: a partition quiet
//! for 5 minutes has its clock 5 minutes past its newest event time, also when that is hours old
//! (a backfill does not look like a silence). That decides only *when* a timer fires, never
//! what it makes: stages keep ids and start times functions of the records alone.

use std::collections::HashMap;

use tributary_schemas::Micros;

#[derive(Debug, Clone, Copy, Default)]
struct Partition {
    /// The newest event time seen.
    watermark: Option<Micros>,
    /// The clock time of the last sweep.
    swept: Option<Micros>,
    /// When the newest record was written to the input topic.
    written: Micros,
}

/// The clocks of a stage's partitions.
#[derive(Debug, Clone)]
pub struct PartitionClocks {
    grace: Micros,
    sweep: Micros,
    partitions: HashMap<i32, Partition>,
}

impl PartitionClocks {
    /// `grace`: how far behind the watermark the clock stands; `sweep`: the interval (at least
    /// 1 s).
    pub fn new(grace: Micros, sweep: Micros) -> Self {
        Self {
            grace,
            sweep: sweep.max(1_000_000),
            partitions: HashMap::new(),
        }
    }

    /// A record of `partition` at `event_time`, written to its topic at `written_at`: the clock
    /// time to sweep the partition to, when a sweep is due.
    pub fn observe(
        &mut self,
        partition: i32,
        event_time: Micros,
        written_at: Micros,
    ) -> Option<Micros> {
        let clock = self.partitions.entry(partition).or_default();
        let watermark = clock.watermark.map_or(event_time, |w| w.max(event_time));
        clock.watermark = Some(watermark);
        clock.written = clock.written.max(written_at);
        let now = watermark.saturating_sub(self.grace);
        let due = clock
            .swept
            .is_none_or(|s| now.div_euclid(self.sweep) > s.div_euclid(self.sweep));
        if due {
            clock.swept = Some(now);
        }
        due.then_some(now)
    }

    /// The input is quiet and the wall clock stands at `wall`: the partitions due a sweep and the
    /// clock time of each.
    pub fn idle(&mut self, wall: Micros) -> Vec<(i32, Micros)> {
        let mut due = Vec::new();
        for (&partition, clock) in &mut self.partitions {
            let Some(watermark) = clock.watermark else {
                continue;
            };
            let quiet = wall.saturating_sub(clock.written).max(0);
            let now = watermark.saturating_add(quiet).saturating_sub(self.grace);
            if clock
                .swept
                .is_some_and(|s| now.saturating_sub(s) < self.sweep)
            {
                continue;
            }
            clock.swept = Some(now);
            due.push((partition, now));
        }
        due.sort_unstable();
        due
    }

    /// The clock time of `partition` now (its watermark less the grace).
    pub fn now(&self, partition: i32) -> Option<Micros> {
        let clock = self.partitions.get(&partition)?;
        Some(
            clock
                .swept
                .unwrap_or(Micros::MIN)
                .max(clock.watermark?.saturating_sub(self.grace)),
        )
    }

    /// The clock time `event_time` stands for (a backtest's end).
    pub fn behind(&self, event_time: Micros) -> Micros {
        event_time.saturating_sub(self.grace)
    }

    /// `partition` restored with `newest` the newest event time its state holds: its clock
    /// starts there, and its quiet time counts from now.
    pub fn restore(&mut self, partition: i32, newest: Option<Micros>) {
        self.partitions.insert(
            partition,
            Partition {
                watermark: newest,
                swept: newest.map(|n| n.saturating_sub(self.grace)),
                written: tributary_schemas::now_micros(),
            },
        );
    }

    pub fn forget(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Micros = 1_000_000;

    #[test]
    fn sweeps_at_each_multiple_crossed_and_the_wall_clock_moves_a_quiet_partition() {
        let mut c = PartitionClocks::new(10 * S, 5 * S);
        assert_eq!(
            c.observe(0, 100 * S, 0),
            Some(90 * S),
            "the first record sweeps"
        );
        assert_eq!(c.observe(0, 103 * S, 0), None);
        assert_eq!(c.observe(0, 99 * S, 0), None, "late records do not move it");
        assert_eq!(c.observe(0, 106 * S, 0), Some(96 * S));
        // Written at 1000 s (a backfill of old readings): quiet time counts from then.
        c.observe(1, 50 * S, 1000 * S);
        let due = c.idle(1003 * S);
        assert!(
            due.iter().all(|(p, _)| *p != 1),
            "3 s of quiet: not a sweep yet: {due:?}"
        );
        let due = c.idle(1030 * S);
        assert!(due.contains(&(1, 70 * S)), "{due:?}");
    }
}
