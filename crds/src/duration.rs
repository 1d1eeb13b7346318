//! Go duration strings (`300ms`, `1m30s`, `1.5h`), as Kubernetes `metav1.Duration` writes them.

use std::time::Duration;

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a duration like 30s, 1m30s or 500ms")]
pub struct DurationError {
    input: String,
}

/// Parses a Go duration: a sequence of decimal numbers with units `ns`, `us`/`µs`, `ms`, `s`,
/// `m`, `h`. Negative durations are rejected; `0` alone is allowed.
pub fn parse_go_duration(input: &str) -> Result<Duration, DurationError> {
    let err = || DurationError {
        input: input.to_owned(),
    };
    let s = input.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(err());
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if num_len == 0 {
            return Err(err());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| err())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        rest = &rest[unit_len..];
        total += value * seconds_per_unit;
    }
    Duration::try_from_secs_f64(total).map_err(|_| err())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let ok = |s: &str, ms: u64| {
            assert_eq!(parse_go_duration(s), Ok(Duration::from_millis(ms)), "{s}")
        };
        ok("1m", 60_000);
        ok("1s", 1_000);
        ok("300ms", 300);
        ok("1m30s", 90_000);
        ok("1.5h", 5_400_000);
        ok("2h45m0s", 9_900_000);
        ok("0", 0);
        for bad in ["", "1", "-1s", "1x", "s", "1.2.3s", "1m 30s"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
