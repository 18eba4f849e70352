//! The value types of the config contract: durations, rates, byte sizes and
//! client-key specs. Each parses once, in its `Deserialize` impl, so a bad value
//! is reported by serde with its key path and position, and nothing downstream
//! ever holds a string still to interpret.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Implements `Deserialize` through `FromStr` for a type whose TOML form is a string.
macro_rules! deserialize_from_str {
    ($ty:ty, $expecting:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(|e: String| de::Error::custom(e))
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.repr())
            }
        }
    };
}

// === Dur ===

/// A humantime duration such as `"250ms"`, `"5s"` or `"1h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dur(pub Duration);

/// No duration in the config is longer than this. Each key has its own,
/// tighter bound (validation); this one keeps an absurd value such as
/// `"100000000000y"` from ever being a `Duration` that a key without one could
/// add to an `Instant`.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let d = humantime::parse_duration(s.trim())
            .map_err(|_| format!("expected a duration such as \"250ms\", \"5s\" or \"1h\", got {s:?}"))?;
        if d > MAX_DURATION {
            return Err(format!("a duration must be at most 365 days, got {s:?}"));
        }
        Ok(Dur(d))
    }
}

impl Dur {
    fn repr(&self) -> String {
        humantime::format_duration(self.0).to_string()
    }
}
deserialize_from_str!(Dur, "a duration");

/// An optional duration where the empty string means "not set" (`expect_traffic_within = ""`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OptDur(pub Option<Duration>);

impl FromStr for OptDur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Ok(OptDur(None));
        }
        s.parse::<Dur>().map(|d| OptDur(Some(d.0)))
    }
}
impl OptDur {
    fn repr(&self) -> String {
        self.0.map(|d| Dur(d).repr()).unwrap_or_default()
    }
}
deserialize_from_str!(OptDur, "a duration or \"\"");

// === Rate ===

/// `"<count>/<s|m|h>"`: `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: NonZeroU32,
    pub per: Duration,
}

impl Rate {
    /// Events per second, for comparisons and display.
    pub fn per_second(&self) -> f64 {
        f64::from(self.count.get()) / self.per.as_secs_f64()
    }
    fn repr(&self) -> String {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        format!("{}/{unit}", self.count)
    }
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("expected \"<n>/<s|m|h>\", got {s:?}");
        let (count, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let count = NonZeroU32::new(count).ok_or_else(|| format!("a rate must be above zero, got {s:?}"))?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        // The emission interval `per / count` is counted in microseconds in
        // Redis (nanoseconds in memory): a faster rate would round to a zero
        // interval, which is no limit at all.
        if per.as_micros() < u128::from(count.get()) {
            return Err(format!("a rate must be at most 1000000/s (one per microsecond), got {s:?}"));
        }
        Ok(Rate { count, per })
    }
}
deserialize_from_str!(Rate, "a rate");

// === ByteSize ===

/// A size in bytes, written as an integer or a string such as `"10MiB"`, `"64KiB"`, `"1MB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || format!("expected a size such as 16384, \"64KiB\" or \"10MiB\", got {s:?}");
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes (an integer, or a string such as \"10MiB\")")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

// === ClientKeySpec ===

/// Where a request's client key (or tenant) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A request header, lower-cased.
    Header(http::HeaderName),
    /// A query-string parameter.
    Query(String),
    /// The peer's IP address.
    Ip,
    /// A hash of the bearer token in `Authorization`; the token itself is never kept.
    Bearer,
}

impl FromStr for KeySource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(name) = s.strip_prefix("header:") {
            return http::HeaderName::from_bytes(name.trim().as_bytes())
                .map(KeySource::Header)
                .map_err(|_| format!("{name:?} is not a valid header name"));
        }
        if let Some(name) = s.strip_prefix("query:") {
            if name.is_empty() {
                return Err("query: needs a parameter name, as in \"query:device\"".into());
            }
            return Ok(KeySource::Query(name.to_string()));
        }
        match s {
            "ip" => Ok(KeySource::Ip),
            "bearer" => Ok(KeySource::Bearer),
            _ => Err(format!("expected \"header:NAME\", \"query:NAME\", \"ip\" or \"bearer\", got {s:?}")),
        }
    }
}

impl KeySource {
    fn repr(&self) -> String {
        match self {
            KeySource::Header(h) => format!("header:{h}"),
            KeySource::Query(q) => format!("query:{q}"),
            KeySource::Ip => "ip".into(),
            KeySource::Bearer => "bearer".into(),
        }
    }
}
deserialize_from_str!(KeySource, "a client key source");

/// An optional key source where `""` means "none" (`tenant_key = ""`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OptKeySource(pub Option<KeySource>);

impl FromStr for OptKeySource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Ok(OptKeySource(None));
        }
        s.parse().map(|k| OptKeySource(Some(k)))
    }
}
impl OptKeySource {
    fn repr(&self) -> String {
        self.0.as_ref().map(KeySource::repr).unwrap_or_default()
    }
}
deserialize_from_str!(OptKeySource, "a key source or \"\"");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_reject_prose() {
        let r: Rate = "10/s".parse().unwrap();
        assert_eq!((r.count.get(), r.per), (10, Duration::from_secs(1)));
        assert_eq!("5000/h".parse::<Rate>().unwrap().per, Duration::from_secs(3600));
        assert!("10 per second".parse::<Rate>().is_err());
        assert!("0/s".parse::<Rate>().is_err());
        assert!("10/d".parse::<Rate>().is_err());
    }

    #[test]
    fn sizes_accept_binary_and_decimal_units() {
        assert_eq!("10MiB".parse::<ByteSize>().unwrap().0, 10 << 20);
        assert_eq!("1MB".parse::<ByteSize>().unwrap().0, 1_000_000);
        assert_eq!("512".parse::<ByteSize>().unwrap().0, 512);
        assert!("ten".parse::<ByteSize>().is_err());
        assert!("99999999999999999999GiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn key_sources() {
        assert_eq!(
            "header:X-Device-Id".parse::<KeySource>().unwrap(),
            KeySource::Header(http::HeaderName::from_static("x-device-id"))
        );
        assert_eq!("bearer".parse::<KeySource>().unwrap(), KeySource::Bearer);
        assert!("cookie:x".parse::<KeySource>().is_err());
        assert_eq!("".parse::<OptKeySource>().unwrap().0, None);
    }
}
