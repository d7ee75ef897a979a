//! `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP date, turned into how long an
//! endpoint stays out of rotation. Pure: the clock is a parameter.

use std::time::{Duration, SystemTime};

/// The wait when a failover status carries no usable `Retry-After`.
pub const DEFAULT_SKIP: Duration = Duration::from_secs(1);

/// How long to skip an endpoint that answered with this `Retry-After` value at `now`, capped
/// by `max`. A date in the past means no wait (zero); an unusable value or none gives
/// [`DEFAULT_SKIP`] (capped too).
pub fn skip_for(value: Option<&[u8]>, now: SystemTime, max: Duration) -> Duration {
    let wait = value.and_then(|v| parse(v, now)).unwrap_or(DEFAULT_SKIP);
    wait.min(max)
}

/// Parses a `Retry-After` value; None when it is neither form.
pub fn parse(value: &[u8], now: SystemTime) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Very long digit strings saturate instead of failing: they mean "a long time".
        let secs = text.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: Duration = Duration::from_secs(60);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn seconds_are_read_and_capped() {
        let now = SystemTime::now();
        assert_eq!(skip_for(Some(b"2"), now, MAX), Duration::from_secs(2));
        assert_eq!(skip_for(Some(b" 7 "), now, MAX), Duration::from_secs(7));
        assert_eq!(skip_for(Some(b"3600"), now, MAX), MAX);
        assert_eq!(skip_for(Some(b"99999999999999999999999"), now, MAX), MAX);
        assert_eq!(skip_for(Some(b"0"), now, MAX), Duration::ZERO);
    }

    #[test]
    fn http_dates_count_from_now() {
        // 784111777 = Sun, 06 Nov 1994 08:49:37 GMT
        let date = b"Sun, 06 Nov 1994 08:49:37 GMT";
        assert_eq!(parse(date, at(784_111_767)), Some(Duration::from_secs(10)));
        assert_eq!(parse(date, at(784_111_800)), Some(Duration::ZERO));
        // The obsolete RFC 850 and asctime forms are accepted too.
        assert_eq!(
            parse(b"Sunday, 06-Nov-94 08:49:37 GMT", at(784_111_776)),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn missing_or_unusable_values_give_the_default() {
        let now = SystemTime::now();
        assert_eq!(skip_for(None, now, MAX), DEFAULT_SKIP);
        assert_eq!(skip_for(Some(b"soon"), now, MAX), DEFAULT_SKIP);
        assert_eq!(skip_for(Some(b"-1"), now, MAX), DEFAULT_SKIP);
        assert_eq!(skip_for(Some(b""), now, MAX), DEFAULT_SKIP);
        assert_eq!(
            skip_for(None, now, Duration::from_millis(500)),
            Duration::from_millis(500)
        );
    }

    proptest! {
        /// No input panics, and the result never exceeds the cap.
        #[test]
        fn any_value_is_bounded(value in proptest::collection::vec(any::<u8>(), 0..40)) {
            prop_assert!(skip_for(Some(&value), SystemTime::now(), MAX) <= MAX);
        }

        #[test]
        fn delay_seconds_round_trip(secs in 0u64..100_000) {
            let v = secs.to_string();
            prop_assert_eq!(parse(v.as_bytes(), SystemTime::now()), Some(Duration::from_secs(secs)));
        }
    }
}
