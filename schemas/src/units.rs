//! Units the metric catalog can name, and conversions between units of one quantity.
//!
//! Every unit of the SenML registry (RFC 8428 §12.1 and the secondary units of RFC 8798: `Cel`,
//! `%RH`, `V`, `J`, `kWh`, `Pa`, `hPa`, `m3`, `l/s`, `bit/s`, …) plus the customary units devices
//! send (`degF`, `psi`, `bar`, `MWh`, …) and a few spellings of them (`°C`, `°F`). Every unit is an
//! affine map onto its quantity's base unit: `base = value × scale + offset`. A metric accepts
//! every unit of its canonical unit's quantity and stores readings converted to the canonical one.

/// A physical quantity: only units of the same quantity convert into each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    Temperature,
    Voltage,
    Current,
    Charge,
    Pressure,
    Energy,
    Power,
    ApparentPower,
    ReactivePower,
    ApparentEnergy,
    ReactiveEnergy,
    PowerLevel,
    Length,
    Area,
    Volume,
    FlowRate,
    Speed,
    Acceleration,
    Duration,
    Frequency,
    Mass,
    Density,
    EnergyPerLength,
    Force,
    Angle,
    SolidAngle,
    Amount,
    Capacitance,
    Resistance,
    Conductance,
    Conductivity,
    MagneticFlux,
    MagneticFluxDensity,
    Inductance,
    LuminousIntensity,
    LuminousFlux,
    Illuminance,
    Luminance,
    Irradiance,
    Radioactivity,
    AbsorbedDose,
    EquivalentDose,
    CatalyticActivity,
    Data,
    DataRate,
    Latitude,
    Longitude,
    Acidity,
    Decibel,
    SoundPressureLevel,
    RelativeHumidity,
    BatteryLevel,
    BatteryTime,
    Ratio,
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

const fn base(name: &'static str, quantity: Quantity) -> Unit {
    unit(name, quantity, 1.0, 0.0)
}

use Quantity::*;

/// Every unit, by canonical name; the first of each quantity is its base unit.
const UNITS: &[Unit] = &[
    base("K", Temperature),
    unit("Cel", Temperature, 1.0, 273.15),
    unit("degF", Temperature, 5.0 / 9.0, 459.67 * 5.0 / 9.0),
    base("V", Voltage),
    unit("mV", Voltage, 1e-3, 0.0),
    unit("kV", Voltage, 1e3, 0.0),
    base("A", Current),
    unit("mA", Current, 1e-3, 0.0),
    base("C", Charge),
    unit("Ah", Charge, 3_600.0, 0.0),
    base("Pa", Pressure),
    unit("hPa", Pressure, 100.0, 0.0),
    unit("kPa", Pressure, 1e3, 0.0),
    unit("MPa", Pressure, 1e6, 0.0),
    unit("mbar", Pressure, 100.0, 0.0),
    unit("bar", Pressure, 1e5, 0.0),
    unit("psi", Pressure, 6_894.757_293_168, 0.0),
    base("J", Energy),
    unit("Wh", Energy, 3_600.0, 0.0),
    unit("kWh", Energy, 3.6e6, 0.0),
    unit("MWh", Energy, 3.6e9, 0.0),
    base("W", Power),
    unit("mW", Power, 1e-3, 0.0),
    unit("kW", Power, 1e3, 0.0),
    unit("MW", Power, 1e6, 0.0),
    base("VA", ApparentPower),
    unit("kVA", ApparentPower, 1e3, 0.0),
    base("var", ReactivePower),
    unit("kvar", ReactivePower, 1e3, 0.0),
    base("VAs", ApparentEnergy),
    unit("kVAh", ApparentEnergy, 3.6e6, 0.0),
    base("vars", ReactiveEnergy),
    unit("varh", ReactiveEnergy, 3_600.0, 0.0),
    unit("kvarh", ReactiveEnergy, 3.6e6, 0.0),
    base("dBW", PowerLevel),
    unit("dBm", PowerLevel, 1.0, -30.0),
    base("m", Length),
    unit("mm", Length, 1e-3, 0.0),
    unit("cm", Length, 1e-2, 0.0),
    unit("km", Length, 1e3, 0.0),
    base("m2", Area),
    base("m3", Volume),
    unit("l", Volume, 1e-3, 0.0),
    base("m3/s", FlowRate),
    unit("l/s", FlowRate, 1e-3, 0.0),
    base("m/s", Speed),
    unit("km/h", Speed, 1.0 / 3.6, 0.0),
    unit("m/h", Speed, 1.0 / 3_600.0, 0.0),
    unit("mm/h", Speed, 1e-3 / 3_600.0, 0.0),
    base("m/s2", Acceleration),
    base("s", Duration),
    unit("ms", Duration, 1e-3, 0.0),
    unit("min", Duration, 60.0, 0.0),
    unit("h", Duration, 3_600.0, 0.0),
    base("Hz", Frequency),
    unit("MHz", Frequency, 1e6, 0.0),
    unit("1/s", Frequency, 1.0, 0.0),
    unit("1/min", Frequency, 1.0 / 60.0, 0.0),
    unit("beat/min", Frequency, 1.0 / 60.0, 0.0),
    base("kg", Mass),
    unit("g", Mass, 1e-3, 0.0),
    base("kg/m3", Density),
    unit("ug/m3", Density, 1e-9, 0.0),
    base("J/m", EnergyPerLength),
    unit("Wh/km", EnergyPerLength, 3.6, 0.0),
    base("N", Force),
    base("rad", Angle),
    unit("deg", Angle, std::f64::consts::PI / 180.0, 0.0),
    base("sr", SolidAngle),
    base("mol", Amount),
    base("F", Capacitance),
    base("Ohm", Resistance),
    base("S", Conductance),
    base("S/m", Conductivity),
    base("Wb", MagneticFlux),
    base("T", MagneticFluxDensity),
    base("H", Inductance),
    base("cd", LuminousIntensity),
    base("lm", LuminousFlux),
    base("lx", Illuminance),
    base("cd/m2", Luminance),
    base("W/m2", Irradiance),
    base("Bq", Radioactivity),
    base("Gy", AbsorbedDose),
    base("Sv", EquivalentDose),
    base("kat", CatalyticActivity),
    base("bit", Data),
    unit("B", Data, 8.0, 0.0),
    unit("KiB", Data, 8_192.0, 0.0),
    unit("GB", Data, 8e9, 0.0),
    base("bit/s", DataRate),
    unit("Mbit/s", DataRate, 1e6, 0.0),
    unit("B/s", DataRate, 8.0, 0.0),
    unit("MB/s", DataRate, 8e6, 0.0),
    base("lat", Latitude),
    base("lon", Longitude),
    base("pH", Acidity),
    base("dB", Decibel),
    base("Bspl", SoundPressureLevel),
    base("%RH", RelativeHumidity),
    base("%EL", BatteryLevel),
    base("EL", BatteryTime),
    base("/", Ratio),
    unit("%", Ratio, 0.01, 0.0),
    unit("/100", Ratio, 0.01, 0.0),
    unit("/1000", Ratio, 1e-3, 0.0),
    unit("ppm", Ratio, 1e-6, 0.0),
    base("count", Count),
    unit("beats", Count, 1.0, 0.0),
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

/// Every unit of `quantity`, its base unit first.
pub fn of(quantity: Quantity) -> impl Iterator<Item = &'static Unit> {
    UNITS.iter().filter(move |u| u.quantity == quantity)
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

    /// RFC 8428 §12.1's units (those with a quantity of their own) and RFC 8798's secondary
    /// units all resolve, and each metric's quantity has its SenML primary unit.
    #[test]
    fn senml_registered_units_resolve() {
        let registered = [
            "m", "kg", "g", "s", "A", "K", "cd", "mol", "Hz", "rad", "sr", "N", "Pa", "J", "W",
            "C", "V", "F", "Ohm", "S", "Wb", "T", "H", "Cel", "lm", "lx", "Bq", "Gy", "Sv", "kat",
            "m2", "m3", "l", "m/s", "m/s2", "m3/s", "l/s", "W/m2", "cd/m2", "bit", "bit/s", "lat",
            "lon", "pH", "dB", "dBW", "Bspl", "count", "/", "%", "%RH", "%EL", "EL", "1/s",
            "1/min", "beat/min", "beats", "S/m", "B", "VA", "VAs", "var", "vars", "J/m", "kg/m3",
            "deg", "ms", "min", "h", "MHz", "kW", "kVA", "kvar", "Ah", "Wh", "kWh", "varh",
            "kvarh", "kVAh", "Wh/km", "KiB", "GB", "Mbit/s", "B/s", "MB/s", "mV", "mA", "dBm",
            "ug/m3", "mm/h", "m/h", "ppm", "/100", "/1000", "hPa", "mm", "cm", "km", "km/h",
        ];
        for name in registered {
            assert_eq!(u(name).name, name);
        }
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9 * b.abs().max(1.0);
        assert!(close(u("J").convert(3.6e6, u("kWh")).unwrap(), 1.0));
        assert!(close(u("Ah").convert(1.0, u("C")).unwrap(), 3_600.0));
        assert!(close(u("dBm").convert(30.0, u("dBW")).unwrap(), 0.0));
        assert!(close(u("ppm").convert(10_000.0, u("%")).unwrap(), 1.0));
        assert!(close(
            u("deg").convert(180.0, u("rad")).unwrap(),
            std::f64::consts::PI
        ));
        assert_eq!(of(Energy).next().map(|u| u.name), Some("J"));
        // Finite in, possibly infinite out at the extremes: the cleanse stage refuses those.
        assert_eq!(u("MWh").convert(1e308, u("J")), Some(f64::INFINITY));
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
