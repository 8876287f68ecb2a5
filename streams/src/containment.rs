//! Containment: what one hostile or unlucky record can do to a stage is fail itself, never the stage.
//!
//! - A panic while a stage processes a record is caught ([`guard`]) and becomes an error of that
//!   record ([`Failure`]), logged loudly with the record's position; the stage returns it to its
//!   supervisor, which starts the stage again from its committed state (state rebuilt from the log,
//!   so nothing the panic left half-done survives).
//! - [`Attempts`] remembers, across those restarts, how often each record failed in a row; after
//!   [`MAX_ATTEMPTS`] the stage does not process it again but dead-letters it (rule
//!   `stage_failure`, with the stage and the panic message) and moves on. Rebuilding state later
//!   skips what was dead-lettered so, so live and rebuilt state agree.
//! - [`FaultInjection`]: a test hook (an environment variable) that makes a stage panic on records
//!   whose bytes contain a marker, so the end-to-end tests can prove the above on a real process.

use std::any::Any;
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;

/// How many times in a row a record may fail before it is dead-lettered (`stage_failure`).
pub const MAX_ATTEMPTS: u32 = 3;

/// The rule of the dead letter of a record a stage gave up on.
pub const STAGE_FAILURE: &str = "stage_failure";

/// A record's position in its topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordId {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A record a stage failed on: where, and why (a panic's message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{stage} failed on {}/{}/{} (attempt {attempt} of {MAX_ATTEMPTS}): {message}", record.topic, record.partition, record.offset)]
pub struct Failure {
    pub stage: &'static str,
    pub record: RecordId,
    pub attempt: u32,
    pub message: String,
}

/// Runs `f` on one record; a panic becomes its message.
pub fn guard<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(p.as_ref()))
}

/// The message of a caught panic.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// Failures in a row per record, kept by a stage across its restarts.
#[derive(Debug, Default)]
pub struct Attempts {
    failed: Mutex<HashMap<RecordId, (u32, String)>>,
}

impl Attempts {
    /// Records one more failure of `record`; the failure with its attempt number.
    pub fn failed(&self, stage: &'static str, record: RecordId, message: String) -> Failure {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        let entry = failed.entry(record.clone()).or_insert((0, String::new()));
        entry.0 += 1;
        entry.1 = message.clone();
        let failure = Failure {
            stage,
            record,
            attempt: entry.0,
            message,
        };
        tracing::error!(
            stage,
            topic = %failure.record.topic,
            partition = failure.record.partition,
            offset = failure.record.offset,
            attempt = failure.attempt,
            of = MAX_ATTEMPTS,
            error = %failure.message,
            "record failed the stage; the stage restarts from its committed state"
        );
        failure
    }

    /// The last failure's message when `record` has failed [`MAX_ATTEMPTS`] times in a row: the
    /// stage must dead-letter it instead of processing it.
    pub fn given_up(&self, topic: &str, partition: i32, offset: i64) -> Option<String> {
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if failed.is_empty() {
            return None;
        }
        let id = RecordId {
            topic: topic.to_owned(),
            partition,
            offset,
        };
        failed
            .get(&id)
            .filter(|(n, _)| *n >= MAX_ATTEMPTS)
            .map(|(_, m)| m.clone())
    }

    /// `record` went through (or was dead-lettered): its count starts again.
    pub fn done(&self, topic: &str, partition: i32, offset: i64) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if failed.is_empty() {
            return;
        }
        failed.remove(&RecordId {
            topic: topic.to_owned(),
            partition,
            offset,
        });
    }
}

/// `TRIBUTARY_FAULT_INJECT_PANIC=<marker>`: stages panic on every record whose bytes contain the
/// marker. For tests of containment only; unset (the default) it costs one branch per record.
#[derive(Debug, Clone, Default)]
pub struct FaultInjection {
    marker: Option<Vec<u8>>,
}

impl FaultInjection {
    pub const VARIABLE: &'static str = "TRIBUTARY_FAULT_INJECT_PANIC";

    pub fn from_env() -> Self {
        let marker = std::env::var(Self::VARIABLE)
            .ok()
            .filter(|m| !m.is_empty())
            .map(String::into_bytes);
        if let Some(m) = &marker {
            tracing::warn!(
                marker = %String::from_utf8_lossy(m),
                "fault injection on: records containing the marker make the stage panic"
            );
        }
        Self { marker }
    }

    /// Panics when `bytes` contain the marker.
    pub fn check(&self, bytes: &[u8]) {
        if let Some(m) = &self.marker
            && bytes.windows(m.len()).any(|w| w == m.as_slice())
        {
            panic!(
                "fault injected: the record contains the marker {}",
                String::from_utf8_lossy(m)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_messages_and_records_are_given_up_after_max_attempts() {
        assert_eq!(guard(|| 1), Ok(1));
        let e = guard(|| -> i32 { panic!("boom {}", 7) }).unwrap_err();
        assert_eq!(e, "boom 7");
        let attempts = Attempts::default();
        let id = RecordId {
            topic: "raw".into(),
            partition: 2,
            offset: 9,
        };
        for n in 1..=MAX_ATTEMPTS {
            assert_eq!(attempts.given_up("raw", 2, 9), None);
            let f = attempts.failed("cleanse", id.clone(), format!("boom {n}"));
            assert_eq!(f.attempt, n);
        }
        assert_eq!(attempts.given_up("raw", 2, 9).as_deref(), Some("boom 3"));
        assert_eq!(
            attempts.given_up("raw", 2, 10),
            None,
            "other records are untouched"
        );
        attempts.done("raw", 2, 9);
        assert_eq!(attempts.given_up("raw", 2, 9), None);
    }

    #[test]
    fn fault_injection_panics_only_on_the_marker() {
        let f = FaultInjection {
            marker: Some(b"POISON".to_vec()),
        };
        f.check(b"harmless");
        assert!(guard(|| f.check(b"a POISON pill")).is_err());
        FaultInjection::default().check(b"POISON");
    }
}
