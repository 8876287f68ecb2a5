//! Sink benchmark: one `telemetry` topic drained, in the same run, by
//! - `bare-consumer` (baseline): a bare rdkafka consumer that reads every record (no decoding);
//! - `delta-sink`: `DeltaSink<Reading>` into a fresh Delta table on the local disk (default
//!   `[lake]` flush settings), until every partition's `txn` offset reached the topic's end; then the
//!   table's files: count, sizes, bytes per row, and how the Parquet compares with the Avro records;
//! - `timeseries-sink`: `TimeSeriesSink` into VictoriaMetrics (Debian's, started by `stack.sh`),
//!   until the store counted every point;
//! - `bare-line-writer` (baseline): the same points pre-encoded, POSTed gzip'd in batches of the
//!   sink's size by one client: what one writer gets from this store on this machine.
//!
//! ```text
//! cargo bench --bench sinks                          # 50 000 readings from 1 000 devices
//! cargo bench --bench sinks -- --readings 2000000 --devices 5000
//! ```

#[path = "../tests/support/mod.rs"]
mod support;
mod topic;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::Stack;
use tributary_lake::LakeConfig;
use tributary_lake::delta_sink::{DeltaSink, open_table, txn_version};
use tributary_lake::line_protocol::{push_point, series_key};
use tributary_lake::timeseries_sink::{
    LineProtocolWriter, TimeSeriesConfig, TimeSeriesSink, WriteOutcome,
};
use tributary_schemas::Reading;
use tributary_schemas::kafka::KafkaConfig;
use tributary_schemas::registry::DeviceRegistry;

struct Options {
    readings: u64,
    devices: u64,
}

fn options() -> Options {
    let mut o = Options {
        readings: 50_000,
        devices: 1_000,
    };
    let args: Vec<String> = std::env::args().collect();
    for (i, a) in args.iter().enumerate() {
        let value = || args.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        match a.as_str() {
            "--readings" => o.readings = value().unwrap_or(o.readings),
            "--devices" => o.devices = value().unwrap_or(o.devices).max(1),
            _ => {}
        }
    }
    o
}

/// Reading `i`: devices in turn, one reading per device per second, two metrics.
fn reading(i: u64, devices: u64, start: i64) -> Reading {
    let device = i % devices;
    let round = (i / devices) as i64;
    let metric = if round % 2 == 0 {
        "temperature"
    } else {
        "humidity"
    };
    Reading {
        tenant: format!("tenant-{}", device % 3 + 1),
        device: format!("dev-{device:05}"),
        metric: metric.into(),
        value: 15.0 + ((i * 7919) % 2000) as f64 / 100.0,
        unit: Some(
            if metric == "temperature" {
                "Cel"
            } else {
                "%RH"
            }
            .into(),
        ),
        original_value: None,
        original_unit: None,
        late: false,
        event_time: start + round * 1_000_000,
        ingest_time: start + round * 1_000_000 + 150_000,
        event_id: format!("e-{device}-{round}"),
        source_topic: "raw".into(),
        source_partition: (device % 3) as i32,
        source_offset: i as i64,
        source_index: 0,
        measurement: Some(0),
        name: None,
        conflict: false,
        device_group: None,
        device_model: None,
        site: Vec::new(),
    }
}

fn main() {
    let o = options();
    // sqlite: the memory engine stalls producing past ~50 000 records of this shape.
    let stack = Stack::start_with_storage(1, &[], "sqlite://tansu.db");
    let mut stack = stack;
    stack.start_timeseries_store();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let kafka = KafkaConfig {
        brokers: format!("127.0.0.1:{}", stack.kafka_port),
        ..KafkaConfig::default()
    };
    let topic = kafka.topics.telemetry.clone();
    println!(
        "sinks bench: {} readings from {} devices on `{topic}` ({} partitions)",
        o.readings, o.devices, kafka.partitions
    );

    // The topic, filled once; the end offset of each partition from the delivery reports.
    let start = tributary_schemas::now_micros() - (o.readings / o.devices) as i64 * 1_000_000;
    let (ends, avro_bytes) =
        runtime.block_on(topic::fill(&kafka, &topic, o.readings, o.devices, |i| {
            reading(i, o.devices, start)
        }));
    println!(
        "topic filled: {} records, {:.1} MB of Avro values",
        o.readings,
        avro_bytes as f64 / 1e6
    );

    // Baseline: a bare consumer reading every record.
    let bare = runtime.block_on(topic::bare_consume(&kafka, &topic, &ends));
    println!("bare-consumer     {bare:>10.0} records/s");

    // Kafka → Delta.
    let lake_dir = stack.path().join("bench-lake");
    let lake = LakeConfig {
        url: lake_dir.display().to_string(),
        ..LakeConfig::default()
    };
    let delta = runtime.block_on(async {
        let sink = DeltaSink::<Reading>::new(kafka.clone(), lake.clone(), topic.clone());
        let started = Instant::now();
        let task = tokio::spawn(async move { sink.run().await });
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let table = open_table(&lake, "telemetry").await.expect("table");
            let mut done = table.version().is_some();
            for (p, end) in &ends {
                let app = format!("tributary-lake/telemetry/{topic}/{p}");
                let at = txn_version(&table, &app).await.expect("txn");
                done &= at.is_some_and(|v| v >= *end);
            }
            if done {
                break;
            }
            assert!(!task.is_finished(), "the Delta sink stopped");
        }
        let rate = o.readings as f64 / started.elapsed().as_secs_f64();
        task.abort();
        rate
    });
    println!(
        "delta-sink        {delta:>10.0} rows/s   ({:.0} % of the bare consumer)",
        100.0 * delta / bare
    );
    let mut files = Vec::new();
    collect_parquet(&lake_dir.join("telemetry"), &mut files);
    let parquet: u64 = files.iter().sum();
    println!(
        "delta files       {} Parquet files, {:.1} MB, mean {:.2} MB/file, {:.1} bytes/row; Avro on Kafka {:.1} bytes/row ({:.1}× smaller as Parquet)",
        files.len(),
        parquet as f64 / 1e6,
        parquet as f64 / 1e6 / files.len().max(1) as f64,
        parquet as f64 / o.readings as f64,
        avro_bytes as f64 / o.readings as f64,
        avro_bytes as f64 / parquet.max(1) as f64,
    );

    // Kafka → VictoriaMetrics.
    let ts = TimeSeriesConfig {
        url: stack.timeseries_url(),
        ..TimeSeriesConfig::default()
    };
    let vm = stack.timeseries_url();
    let before = runtime.block_on(inserted(&vm));
    let sink_rate = runtime.block_on(async {
        let sink = TimeSeriesSink::new(
            kafka.clone(),
            ts.clone(),
            topic.clone(),
            Arc::new(DeviceRegistry::new()),
        );
        let started = Instant::now();
        let task = tokio::spawn(async move { sink.run().await });
        while inserted(&vm).await < before + o.readings {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!task.is_finished(), "the time-series sink stopped");
        }
        let rate = o.readings as f64 / started.elapsed().as_secs_f64();
        task.abort();
        rate
    });
    println!(
        "timeseries-sink   {sink_rate:>10.0} points/s (batches of {}, gzip)",
        ts.batch_points
    );

    // Baseline: the same points, pre-encoded, written by one client.
    let bare_writer = runtime.block_on(async {
        let writer = LineProtocolWriter::new(&ts).expect("writer");
        let mut batches = Vec::new();
        let mut lines = String::new();
        let mut n = 0;
        for i in 0..o.readings {
            let r = reading(i, o.devices, start);
            push_point(
                &mut lines,
                &series_key(&ts.measurement, &r.tenant, &r.device, &[]),
                &r,
            );
            n += 1;
            if n == ts.batch_points {
                batches.push(std::mem::take(&mut lines));
                n = 0;
            }
        }
        batches.push(lines);
        let started = Instant::now();
        for b in &batches {
            assert_eq!(writer.write(b).await, WriteOutcome::Written);
        }
        o.readings as f64 / started.elapsed().as_secs_f64()
    });
    println!(
        "bare-line-writer  {bare_writer:>10.0} points/s (sink: {:.0} % of it)",
        100.0 * sink_rate / bare_writer
    );
}

/// Sizes of every Parquet file under `dir`.
fn collect_parquet(dir: &std::path::Path, out: &mut Vec<u64>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_parquet(&path, out);
        } else if path.extension().is_some_and(|e| e == "parquet") {
            out.push(entry.metadata().map(|m| m.len()).unwrap_or(0));
        }
    }
}

/// Rows VictoriaMetrics took in over InfluxDB line protocol.
async fn inserted(base: &str) -> u64 {
    let text = match reqwest::get(format!("{base}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return 0,
    };
    text.lines()
        .find_map(|l| l.strip_prefix("vm_rows_inserted_total{type=\"influx\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}
