//! Progress of long jobs (replays, rebuilds): a bar on a terminal, a log line every 5 s otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// One job's progress.
pub struct Progress {
    label: &'static str,
    bar: Option<ProgressBar>,
    done: u64,
    total: Option<u64>,
    started: Instant,
    logged: Instant,
}

const LOG_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    /// `total` when known (a bar with an ETA), else a counter.
    pub fn new(label: &'static str, total: Option<u64>) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match total {
                Some(n) => ProgressBar::new(n).with_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                ),
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{spinner} {msg} {pos} ({per_sec})")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                ),
            };
            bar.set_message(label);
            bar
        });
        Self {
            label,
            bar,
            done: 0,
            total,
            started: Instant::now(),
            logged: Instant::now(),
        }
    }

    /// `n` more units done.
    pub fn add(&mut self, n: u64) {
        self.done += n;
        match &self.bar {
            Some(bar) => bar.inc(n),
            None if self.logged.elapsed() >= LOG_EVERY => {
                self.logged = Instant::now();
                let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
                tracing::info!(job = self.label, done = self.done, total = ?self.total, per_sec = rate as u64, "progress");
            }
            None => {}
        }
    }

    /// The job is over.
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish();
        }
        tracing::info!(
            job = self.label,
            done = self.done,
            secs = self.started.elapsed().as_secs_f64(),
            "finished"
        );
    }
}
