//! Units the metric catalog can name, and conversions between units of one quantity.
//!
//! Names follow SenML (RFC 8428: `Cel`, `%RH`, `V`, `kWh`, …) plus the customary units devices send
//! (`degF`, `psi`, `bar`, `mV`, `Wh`, …) and a few spellings of them (`°C`, `°F`). Every unit is an
//! affine map onto its quantity's base unit: `base = value × scale + offset`.

/// A physical quantity: only units of the same quantity convert into each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    Temperature,
    Voltage,
    Current,
    Pressure,
    Energy,
    Power,
    Length,
    Speed,
    Duration,
    RelativeHumidity,
    Ratio,
    Concentration,
    Count,
}

/// One unit: its canonical name and how it maps onto its quantity's base unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Unit {
    pub name: &'static str,
    pub quantity: Quantity,
    scale: f64,
    offset: f64,
}

const fn unit(name: &'static str, quantity: Quantity, scale: f64, offset: f64) -> Unit {
    Unit {
        name,
        quantity,
        scale,
        offset,
    }
}

use Quantity::*;

/// Every unit, by canonical name. Base units: K, V, A, Pa, J, W, m, m/s, s, %RH, 1, ppm, count.
const UNITS: &[Unit] = &[
    unit("K", Temperature, 1.0, 0.0),
    unit("Cel", Temperature, 1.0, 273.15),
    unit("degF", Temperature, 5.0 / 9.0, 459.67 * 5.0 / 9.0),
    unit("V", Voltage, 1.0, 0.0),
    unit("mV", Voltage, 1e-3, 0.0),
    unit("kV", Voltage, 1e3, 0.0),
    unit("A", Current, 1.0, 0.0),
    unit("mA", Current, 1e-3, 0.0),
    unit("Pa", Pressure, 1.0, 0.0),
    unit("hPa", Pressure, 100.0, 0.0),
    unit("kPa", Pressure, 1e3, 0.0),
    unit("MPa", Pressure, 1e6, 0.0),
    unit("mbar", Pressure, 100.0, 0.0),
    unit("bar", Pressure, 1e5, 0.0),
    unit("psi", Pressure, 6_894.757_293_168, 0.0),
    unit("J", Energy, 1.0, 0.0),
    unit("Wh", Energy, 3_600.0, 0.0),
    unit("kWh", Energy, 3.6e6, 0.0),
    unit("MWh", Energy, 3.6e9, 0.0),
    unit("W", Power, 1.0, 0.0),
    unit("mW", Power, 1e-3, 0.0),
    unit("kW", Power, 1e3, 0.0),
    unit("MW", Power, 1e6, 0.0),
    unit("m", Length, 1.0, 0.0),
    unit("mm", Length, 1e-3, 0.0),
    unit("cm", Length, 1e-2, 0.0),
    unit("km", Length, 1e3, 0.0),
    unit("m/s", Speed, 1.0, 0.0),
    unit("km/h", Speed, 1.0 / 3.6, 0.0),
    unit("s", Duration, 1.0, 0.0),
    unit("ms", Duration, 1e-3, 0.0),
    unit("min", Duration, 60.0, 0.0),
    unit("h", Duration, 3_600.0, 0.0),
    unit("%RH", RelativeHumidity, 1.0, 0.0),
    unit("/", Ratio, 1.0, 0.0),
    unit("%", Ratio, 0.01, 0.0),
    unit("ppm", Concentration, 1.0, 0.0),
    unit("count", Count, 1.0, 0.0),
];

/// Other spellings devices use, and the canonical name they mean.
const ALIASES: &[(&str, &str)] = &[
    ("°C", "Cel"),
    ("degC", "Cel"),
    ("°F", "degF"),
    ("Fahrenheit", "degF"),
    ("kelvin", "K"),
    ("%rh", "%RH"),
    ("percent", "%"),
];

/// Looks a unit up by its name or an alias of it.
pub fn lookup(name: &str) -> Option<&'static Unit> {
    let name = ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or(name, |(_, canonical)| canonical);
    UNITS.iter().find(|u| u.name == name)
}

impl Unit {
    /// `value` in this unit, expressed in `to`; `None` when the quantities differ.
    pub fn convert(&self, value: f64, to: &Unit) -> Option<f64> {
        if self.quantity != to.quantity {
            return None;
        }
        if self.name == to.name {
            return Some(value);
        }
        let base = value * self.scale + self.offset;
        Some((base - to.offset) / to.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn u(name: &str) -> &'static Unit {
        lookup(name).unwrap_or_else(|| panic!("{name} is a unit"))
    }

    #[test]
    fn known_conversions() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9 * b.abs().max(1.0);
        assert!(close(u("degF").convert(212.0, u("Cel")).unwrap(), 100.0));
        assert!(close(u("degF").convert(-40.0, u("Cel")).unwrap(), -40.0));
        assert!(close(u("K").convert(0.0, u("Cel")).unwrap(), -273.15));
        assert!(close(u("mV").convert(3_300.0, u("V")).unwrap(), 3.3));
        assert!(close(
            u("psi").convert(1.0, u("kPa")).unwrap(),
            6.894_757_293_168
        ));
        assert!(close(u("bar").convert(1.0, u("kPa")).unwrap(), 100.0));
        assert!(close(u("Wh").convert(1_500.0, u("kWh")).unwrap(), 1.5));
        assert!(close(u("°F").convert(32.0, u("°C")).unwrap(), 0.0));
        assert_eq!(u("V").convert(1.0, u("Cel")), None, "different quantities");
        assert!(lookup("furlong").is_none());
    }

    #[test]
    fn every_unit_and_alias_resolves_and_names_are_unique() {
        for (alias, canonical) in ALIASES {
            assert_eq!(u(alias).name, *canonical);
        }
        for (i, a) in UNITS.iter().enumerate() {
            assert!(
                UNITS[i + 1..].iter().all(|b| b.name != a.name),
                "{}",
                a.name
            );
        }
    }

    fn same_quantity_pair() -> impl Strategy<Value = (&'static Unit, &'static Unit)> {
        (0..UNITS.len()).prop_flat_map(|i| {
            let a = &UNITS[i];
            let peers: Vec<&'static Unit> =
                UNITS.iter().filter(|b| b.quantity == a.quantity).collect();
            proptest::sample::select(peers).prop_map(move |b| (a, b))
        })
    }

    proptest! {
        /// a → b → a gives the value back (to floating-point precision).
        #[test]
        fn conversions_round_trip((a, b) in same_quantity_pair(), v in -1e9f64..1e9) {
            let there = a.convert(v, b).unwrap();
            let back = b.convert(there, a).unwrap();
            prop_assert!((back - v).abs() <= 1e-9 * v.abs().max(1.0), "{v} {} -> {there} {} -> {back}", a.name, b.name);
        }

        /// a → b → c equals a → c.
        #[test]
        fn conversions_compose((a, b) in same_quantity_pair(), v in -1e6f64..1e6) {
            for c in UNITS.iter().filter(|c| c.quantity == a.quantity) {
                let via = b.convert(a.convert(v, b).unwrap(), c).unwrap();
                let direct = a.convert(v, c).unwrap();
                prop_assert!((via - direct).abs() <= 1e-9 * direct.abs().max(1.0));
            }
        }

        /// Conversions keep order (every unit scales by a positive factor).
        #[test]
        fn conversions_are_monotonic((a, b) in same_quantity_pair(), x in -1e6f64..1e6, d in 1e-3f64..1e3) {
            prop_assert!(a.convert(x, b).unwrap() < a.convert(x + d, b).unwrap());
        }
    }
}
