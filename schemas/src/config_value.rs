//! Deserialisers for configuration values that are text but may arrive as numbers: environment
//! overrides are parsed, so `TRIBUTARY_KAFKA__INSTANCE_ID=2` is the number 2, and an instance id or
//! a client id of digits must still be accepted as the text `"2"`.

use serde::{Deserialize, Deserializer};

#[derive(Deserialize)]
#[serde(untagged)]
enum TextOrNumber {
    Str(String),
    Unsigned(u64),
    Signed(i64),
}

/// A string, or a number taken as its decimal text.
pub fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match TextOrNumber::deserialize(d)? {
        TextOrNumber::Str(s) => s,
        TextOrNumber::Unsigned(n) => n.to_string(),
        TextOrNumber::Signed(n) => n.to_string(),
    })
}
