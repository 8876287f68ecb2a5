//! SQL functions the query sessions add to DataFusion's: [`UtcDateTrunc`], `date_trunc` on the
//! lake's UTC timestamps by arithmetic.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, make_array};
use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::ScalarValue;
use datafusion::error::Result;
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature,
};

/// `date_trunc` whose UTC timestamps take DataFusion's arithmetic path.
///
/// Every timestamp of the lake is UTC (`Timestamp(µs, "UTC")`). DataFusion truncates a timestamp
/// with a time zone value by value through the zone's calendar, even for UTC, where an hour or a
/// day is fixed arithmetic — the path it takes for timestamps without a zone. This function
/// hands UTC timestamps to DataFusion's own `date_trunc` as zone-less and puts the zone back, so
/// `date_trunc('hour', event_time)` over millions of rows costs what `date_bin` does; every other
/// input goes to DataFusion's function unchanged.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct UtcDateTrunc {
    inner: ScalarUDF,
}

impl UtcDateTrunc {
    /// The function replacing DataFusion's `date_trunc` (and its alias `datetrunc`).
    pub fn udf() -> ScalarUDF {
        let inner = datafusion::functions::datetime::date_trunc()
            .as_ref()
            .clone();
        ScalarUDF::new_from_impl(Self { inner })
    }
}

/// Whether `tz` is UTC under another name.
fn is_utc(tz: &str) -> bool {
    matches!(
        tz,
        "UTC" | "utc" | "Z" | "+00:00" | "+00" | "Etc/UTC" | "GMT"
    )
}

/// `array` (timestamps) with time zone `tz`, sharing its values.
fn with_zone(array: &ArrayRef, tz: Option<Arc<str>>) -> Option<ArrayRef> {
    let DataType::Timestamp(unit, _) = array.data_type() else {
        return None;
    };
    let data = array
        .to_data()
        .into_builder()
        .data_type(DataType::Timestamp(*unit, tz))
        .build()
        .ok()?;
    Some(make_array(data))
}

/// `field` typed as a zone-less timestamp.
fn zoneless(field: &FieldRef) -> FieldRef {
    match field.data_type() {
        DataType::Timestamp(unit, Some(_)) => Arc::new(Field::new(
            field.name(),
            DataType::Timestamp(*unit, None),
            field.is_nullable(),
        )),
        _ => field.clone(),
    }
}

impl ScalarUDFImpl for UtcDateTrunc {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let utc = match args.args.get(1) {
            Some(ColumnarValue::Array(a)) => match a.data_type() {
                DataType::Timestamp(_, Some(tz)) if is_utc(tz) => Some(tz.clone()),
                _ => None,
            },
            _ => None,
        };
        let (Some(tz), Some(ColumnarValue::Array(values))) = (utc, args.args.get(1)) else {
            return self.inner.invoke_with_args(args);
        };
        let Some(plain) = with_zone(values, None) else {
            return self.inner.invoke_with_args(args);
        };
        let truncated = self.inner.invoke_with_args(ScalarFunctionArgs {
            args: vec![args.args[0].clone(), ColumnarValue::Array(plain)],
            arg_fields: args.arg_fields.iter().map(zoneless).collect(),
            number_rows: args.number_rows,
            return_field: zoneless(&args.return_field),
            config_options: args.config_options.clone(),
        })?;
        Ok(match truncated {
            ColumnarValue::Array(a) => match with_zone(&a, Some(tz)) {
                Some(zoned) => ColumnarValue::Array(zoned),
                None => ColumnarValue::Array(a),
            },
            ColumnarValue::Scalar(ScalarValue::TimestampMicrosecond(v, _)) => {
                ColumnarValue::Scalar(ScalarValue::TimestampMicrosecond(v, Some(tz)))
            }
            other => other,
        })
    }

    fn output_ordering(&self, input: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.output_ordering(input)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    /// The same truncations with DataFusion's function and this one, in UTC and in a zone with
    /// daylight saving time (which this one leaves to DataFusion).
    #[tokio::test]
    async fn truncates_like_datafusion() {
        let reference = SessionContext::new();
        let ours = SessionContext::new();
        ours.register_udf(UtcDateTrunc::udf());
        let mut answers = Vec::new();
        for ctx in [&reference, &ours] {
            let mut text = String::new();
            for g in ["second", "minute", "hour", "day", "week", "month", "year"] {
                let sql = format!(
                    "SELECT date_trunc('{g}', t) AS d, date_trunc('{g}', t AT TIME ZONE 'Europe/Berlin') AS b \
                     FROM (SELECT CAST(x AS TIMESTAMP) AT TIME ZONE 'UTC' AS t FROM (VALUES \
                       ('2026-03-29T01:59:59.999999'), ('2026-10-25T02:30:00'), ('1969-12-31T23:59:59.5'), \
                       ('2026-11-28T10:17:42.123456')) AS v(x)) ORDER BY t"
                );
                let batches = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
                text.push_str(
                    &arrow::util::pretty::pretty_format_batches(&batches)
                        .unwrap()
                        .to_string(),
                );
            }
            answers.push(text);
        }
        assert_eq!(answers[0], answers[1]);
        assert!(
            answers[1].contains("2026-11-28T10:00:00Z"),
            "{}",
            answers[1]
        );
        assert!(
            answers[1].contains("1969-12-31T23:59:59Z"),
            "{}",
            answers[1]
        );
    }
}
