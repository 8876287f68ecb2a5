//! InfluxDB line protocol: how a clean reading becomes a point of the time-series store.
//!
//! ```text
//! telemetry,device=d-1,site_1=north,site_2=hall-3,tenant=acme temperature=21.5 1795392000000000
//! ```
//!
//! - measurement: configurable (`timeseries.measurement`, default `telemetry`);
//! - tags, sorted by key (what InfluxDB recommends): `device`, the device's site hierarchy from the
//!   registry as `site_1` (outermost) … `site_n`, and `tenant`;
//! - `conflict=true` on a second value of the same instant that the tenant keeps
//!   (`conflicting_readings = "keep_both"`), so the store keeps both points like the lake;
//! - one field: the metric, its normalised value (always a float, so a field never changes type);
//! - the timestamp: the event time in microseconds (write with `precision=us`).
//!
//! A point is identified by its series (measurement + tags) and timestamp: writing it again replaces
//! it in InfluxDB and is deduplicated by VictoriaMetrics (`-dedup.minScrapeInterval`), so a batch
//! re-written after a crash or a retry is harmless.

use std::fmt::Write as _;

use tributary_schemas::Reading;

/// Appends `s` escaped for a tag key, tag value or field key: commas, equals signs and spaces are
/// backslash-escaped; line breaks (which end a line whatever the escaping) become spaces, escaped.
fn push_escaped(out: &mut String, s: &str, escape_equals: bool) {
    for c in s.chars() {
        match c {
            ',' | ' ' => {
                out.push('\\');
                out.push(c);
            }
            '=' if escape_equals => out.push_str("\\="),
            '\n' | '\r' => out.push_str("\\ "),
            _ => out.push(c),
        }
    }
}

/// The series key of a device's points: measurement and tags, escaped, sorted by tag key.
pub fn series_key(measurement: &str, tenant: &str, device: &str, site: &[String]) -> String {
    let mut out = String::with_capacity(64);
    push_escaped(&mut out, measurement, false);
    let tag = |out: &mut String, key: &str, value: &str| {
        // An empty tag value is not allowed: the tag is left out.
        if !value.is_empty() {
            out.push(',');
            push_escaped(out, key, true);
            out.push('=');
            push_escaped(out, value, true);
        }
    };
    tag(&mut out, "device", device);
    // `site_1` … `site_9` sort as numbers only up to 9 levels; deeper levels still sort before
    // `tenant` (InfluxDB accepts any order, sorting only saves it work).
    for (level, name) in site.iter().enumerate() {
        tag(&mut out, &format!("site_{}", level + 1), name);
    }
    tag(&mut out, "tenant", tenant);
    out
}

/// Appends the line of one reading of a series (see [`series_key`]).
pub fn push_point(out: &mut String, series: &str, reading: &Reading) {
    out.push_str(series);
    if reading.conflict {
        // A second value the tenant keeps beside the first (`keep_both`): a series of its own,
        // or the store would keep one point where the lake holds two.
        out.push_str(",conflict=true");
    }
    out.push(' ');
    push_escaped(out, &reading.metric, true);
    out.push('=');
    // `{:?}` keeps a float a float (`21.0`, not `21`, which InfluxDB would also read as a float, but
    // an integer-looking value invites confusion) and prints every digit needed to read it back.
    // Values are finite: the cleanse stage dead-letters NaN and ±Inf.
    let _ = write!(out, "{:?}", reading.value);
    let _ = writeln!(out, " {}", reading.event_time);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(metric: &str, value: f64) -> Reading {
        Reading {
            tenant: "acme".into(),
            device: "d-1".into(),
            metric: metric.into(),
            value,
            unit: Some("Cel".into()),
            original_value: None,
            original_unit: None,
            late: false,
            event_time: 1_795_392_000_123_456,
            ingest_time: 1_795_392_001_000_000,
            event_id: "e1".into(),
            source_topic: "raw".into(),
            source_partition: 0,
            source_offset: 7,
            source_index: 0,
            measurement: Some(0),
            name: None,
            conflict: false,
            device_group: None,
            device_model: None,
            site: Vec::new(),
        }
    }

    #[test]
    fn a_reading_is_one_line_with_sorted_tags() {
        let series = series_key(
            "telemetry",
            "acme",
            "d-1",
            &["north".into(), "hall-3".into()],
        );
        let mut out = String::new();
        push_point(&mut out, &series, &reading("temperature", 21.0));
        push_point(&mut out, &series, &reading("humidity", 0.1 + 0.2));
        assert_eq!(
            out,
            "telemetry,device=d-1,site_1=north,site_2=hall-3,tenant=acme temperature=21.0 1795392000123456\n\
             telemetry,device=d-1,site_1=north,site_2=hall-3,tenant=acme humidity=0.30000000000000004 1795392000123456\n"
        );
    }

    #[test]
    fn special_characters_are_escaped_and_empty_tags_left_out() {
        let series = series_key(
            "tele metry",
            "a,b",
            "x=y z",
            &["".into(), "line\nbreak".into()],
        );
        assert_eq!(
            series,
            "tele\\ metry,device=x\\=y\\ z,site_2=line\\ break,tenant=a\\,b"
        );
        let mut out = String::new();
        push_point(&mut out, &series, &reading("flow rate,l=1", -1.5e-7));
        assert!(
            out.ends_with(" flow\\ rate\\,l\\=1=-1.5e-7 1795392000123456\n"),
            "{out}"
        );
        assert_eq!(out.lines().count(), 1);
    }
}
