//! Device shadows on one core: the shadow stage's logic beside the bare decoding any consumer of
//! `shadow-updates` pays, and the in-memory view that serves `GET /v1/devices/{id}/shadow` at
//! scale (read latency and memory per shadow).
//!
//! ```text
//! cargo bench -p tributary-streams --bench shadows     # 1 000 000 updates of 100 000 shadows; a view of 1 000 000 shadows
//! cargo bench -p tributary-streams --bench shadows -- 200000 20000 100000   # updates, shadows, view shadows
//! ```
//!
//! Updates are Avro-framed `ShadowUpdate`s as the endpoints log them: 4 in 5 a device's report
//! (`temperature`, `firmware`), 1 in 5 an app's desired `led`. The stage path is
//! `ShadowRun::process` as the runtime calls it (decode, the single-writer state, the document
//! algebra, the new document and the answers encoded for `shadows` and `shadow-responses`) plus the
//! state changelog at each commit (every `runtime::COMMIT_EVERY` of wall time). Baseline: decoding
//! the record and parsing its JSON body, nothing else.
//! View: every shadow's document as the stage writes it to `shadows`, applied to a `ShadowView`;
//! the heap it holds (counted by the allocator), then random reads through `get_endpoint` (what
//! the HTTP handler calls: the lookup and the document parsed for the response) timed one by one.

use std::time::{Duration, Instant};

use tributary_schemas::avro::{ShadowDocument, ShadowOrigin, ShadowUpdate, decode, encode};
use tributary_schemas::kafka::KafkaConfig;
use tributary_schemas::shadows::{self, Limits, Shadow, ShadowConfig, ShadowView};
use tributary_streams::runtime::{COMMIT_EVERY, Position, Stage};
use tributary_streams::shadows::{ShadowRun, apply};

mod heap;

#[global_allocator]
static ALLOCATOR: heap::Counting = heap::Counting;

const T0: i64 = 1_795_000_000_000_000;

fn update(i: usize, shadows: usize) -> ShadowUpdate {
    let d = i % shadows;
    let step = (i / shadows) as i64;
    let (origin, body) = if i % 5 == 4 {
        let led = if step % 2 == 0 { "on" } else { "off" };
        (
            ShadowOrigin::App,
            format!(r#"{{"state":{{"desired":{{"led":"{led}"}}}},"clientToken":"c-{i}"}}"#),
        )
    } else {
        let temp = 20.0 + (i % 97) as f64 / 10.0;
        (
            ShadowOrigin::Device,
            format!(r#"{{"state":{{"reported":{{"temperature":{temp},"firmware":"2.4.1"}}}}}}"#),
        )
    };
    ShadowUpdate {
        request_id: format!("r-{i}"),
        tenant: format!("tenant-{}", d % 3),
        device: format!("device-{d:07}"),
        name: String::new(),
        origin,
        actor: "bench".into(),
        received_at: T0 + step * 1_000_000 + d as i64,
        body: body.into_bytes(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let updates = args.first().copied().unwrap_or(1_000_000);
    let shadow_count = args.get(1).copied().unwrap_or(100_000).max(1);
    let view_shadows = args.get(2).copied().unwrap_or(1_000_000).max(1);

    let records: Vec<Vec<u8>> = (0..updates)
        .map(|i| encode(&update(i, shadow_count)).expect("encode"))
        .collect();

    // Baseline: decode and parse only.
    let started = Instant::now();
    let mut fields = 0usize;
    for r in &records {
        let u = decode::<ShadowUpdate>(r).expect("decode");
        let body: serde_json::Value = serde_json::from_slice(&u.body).expect("json");
        fields += body["state"].as_object().map_or(0, |s| s.len());
    }
    let bare = started.elapsed();
    std::hint::black_box(fields);

    let mut run = ShadowRun::new(&KafkaConfig::default(), &ShadowConfig::default());
    run.state().start_empty(0);
    let mut emitted = 0usize;
    let mut changelog_bytes = 0usize;
    let mut committed = Instant::now();
    let flush = |run: &mut ShadowRun| {
        run.checkpoint()
            .expect("changelog")
            .iter()
            .map(|e| e.key.len() + e.value.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
    };
    let started = Instant::now();
    for (i, r) in records.iter().enumerate() {
        let at = Position {
            topic: "shadow-updates",
            partition: 0,
            offset: i as i64,
            written_at: 0,
        };
        emitted += run.process(at, r).expect("process").len();
        if (i + 1).is_multiple_of(1000) && committed.elapsed() >= COMMIT_EVERY {
            changelog_bytes += flush(&mut run);
            committed = Instant::now();
        }
    }
    changelog_bytes += flush(&mut run);
    let staged = started.elapsed();
    let rate = |d: Duration| updates as f64 / d.as_secs_f64();
    println!(
        "updates: {updates} of {shadow_count} shadows ({emitted} records out: documents, answers, deltas); {}",
        run.summary()
    );
    println!(
        "  bare decode + parse:        {:>10.0} updates/s",
        rate(bare)
    );
    println!(
        "  shadow stage (apply + encode + changelog): {:>10.0} updates/s ({:.0} % of bare); changelog {:.0} bytes per update",
        rate(staged),
        100.0 * bare.as_secs_f64() / staged.as_secs_f64(),
        changelog_bytes as f64 / updates as f64
    );
    drop(run);
    drop(records);

    // The view at scale: each shadow's document after a desired and a reported update, as the
    // stage emits it.
    let limits = Limits::default();
    let document = |d: usize| -> ShadowDocument {
        let mut shadow = Shadow::default();
        let mut last = None;
        for i in [d * 5 + 4, d * 5] {
            let mut u = update(i, usize::MAX);
            u.device = format!("device-{d:07}");
            u.tenant = format!("tenant-{}", d % 3);
            last = apply(&mut shadow, &u, &limits).document.or(last);
        }
        last.expect("a document")
    };
    let sample = document(0);
    let before = heap::live();
    let view = ShadowView::default();
    for d in 0..view_shadows {
        let doc = document(d);
        view.apply(&shadows::key(&doc.tenant, &doc.device, ""), Some(doc));
    }
    let held = (heap::live() - before).max(0) as f64;
    let reads = 200_000usize;
    let mut latencies = Vec::with_capacity(reads);
    let mut ok = 0usize;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..reads {
        // xorshift: reads spread over the whole view, not one hot shadow.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let d = (x % view_shadows as u64) as usize;
        let (tenant, device) = (format!("tenant-{}", d % 3), format!("device-{d:07}"));
        let started = Instant::now();
        let answer = shadows::get_endpoint(&view, &tenant, &device, "");
        latencies.push(started.elapsed());
        ok += usize::from(answer.status == 200);
    }
    assert_eq!(ok, reads, "every shadow read back");
    latencies.sort();
    println!(
        "view: {} shadows, {:.0} MiB heap, {:.0} bytes per shadow (document {} bytes of JSON); 1 M shadows ≈ {:.2} GiB",
        view.len(),
        held / (1u64 << 20) as f64,
        held / view_shadows as f64,
        sample.document.len(),
        held / view_shadows as f64 * 1e6 / (1u64 << 30) as f64
    );
    println!(
        "  GET (get_endpoint) of {reads} random shadows: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        percentile(&latencies, 0.5).as_secs_f64() * 1e6,
        percentile(&latencies, 0.99).as_secs_f64() * 1e6,
        latencies[reads - 1].as_secs_f64() * 1e6
    );
}
