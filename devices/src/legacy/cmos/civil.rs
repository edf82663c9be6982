//! Civil (proleptic Gregorian) dates and Unix time, for the clock registers.

use serde::{Deserialize, Serialize};

/// Seconds in a day (Unix time has no leap seconds).
pub(super) const SECS_PER_DAY: i64 = 86_400;

/// A broken-down date and time, as the clock registers hold it (always binary, 24-hour).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosDateTime {
    /// Full year (century included).
    pub year: i64,
    /// Month, 1..=12.
    pub month: u8,
    /// Day of the month, 1..=31.
    pub day: u8,
    /// Day of the week, 1 (Sunday) ..= 7.
    pub weekday: u8,
    /// Hour, 0..=23.
    pub hour: u8,
    /// Minute, 0..=59.
    pub minute: u8,
    /// Second, 0..=59.
    pub second: u8,
}

fn is_leap_year(year: i64) -> bool {
    year.rem_euclid(4) == 0 && (year.rem_euclid(100) != 0 || year.rem_euclid(400) == 0)
}

fn days_in_month(year: i64, month: u8) -> u8 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Leap years in 1..year (proleptic Gregorian; works for years before 1 too).
fn leap_years_before(year: i64) -> i64 {
    let y = year - 1;
    y.div_euclid(4) - y.div_euclid(100) + y.div_euclid(400)
}

/// Days from 1970-01-01 to January 1st of `year`.
fn days_before_year(year: i64) -> i64 {
    365 * (year - 1970) + leap_years_before(year) - leap_years_before(1970)
}

/// Days since 1970-01-01 of a valid date (`None` if month or day is out of range).
fn days_from_civil(year: i64, month: u8, day: u8) -> Option<i64> {
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let days_before_month: i64 = (1..month).map(|m| i64::from(days_in_month(year, m))).sum();
    Some(days_before_year(year) + days_before_month + i64::from(day) - 1)
}

/// The date `days` after 1970-01-01, as (year, month, day).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    // 146097 days per 400 years: a first guess within a year or two of the answer.
    let mut year = 1970 + days.saturating_mul(400).div_euclid(146_097);
    while days_before_year(year) > days {
        year -= 1;
    }
    while days_before_year(year + 1) <= days {
        year += 1;
    }
    let mut day_of_year = days - days_before_year(year);
    let mut month = 1;
    while month < 12 && day_of_year >= i64::from(days_in_month(year, month)) {
        day_of_year -= i64::from(days_in_month(year, month));
        month += 1;
    }
    // day_of_year < 31 here, so the conversion cannot fail.
    (year, month, u8::try_from(day_of_year + 1).unwrap_or(1))
}

pub(super) fn date_time_from_unix(secs: i64) -> CmosDateTime {
    let days = secs.div_euclid(SECS_PER_DAY);
    let second_of_day = secs.rem_euclid(SECS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday (register value 5, Sunday being 1).
    let weekday = (days + 4).rem_euclid(7) + 1;
    let small = |v: i64| u8::try_from(v).unwrap_or(0);
    CmosDateTime {
        year,
        month,
        day,
        weekday: small(weekday),
        hour: small(second_of_day / 3600),
        minute: small(second_of_day / 60 % 60),
        second: small(second_of_day % 60),
    }
}

/// Seconds since the epoch of a valid time; the weekday is ignored (it follows from the date).
pub(super) fn unix_from_date_time(time: &CmosDateTime) -> Option<i64> {
    if time.hour > 23 || time.minute > 59 || time.second > 59 {
        return None;
    }
    let days = days_from_civil(time.year, time.month, time.day)?;
    let second_of_day =
        i64::from(time.hour) * 3600 + i64::from(time.minute) * 60 + i64::from(time.second);
    Some(days * SECS_PER_DAY + second_of_day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_from_civil_at_boundaries() {
        assert_eq!(days_from_civil(1970, 1, 1), Some(0));
        assert_eq!(days_from_civil(1969, 12, 31), Some(-1));
        assert_eq!(days_from_civil(1900, 3, 1), Some(-25_508));
        assert_eq!(days_from_civil(2000, 1, 1), Some(10_957));
        assert_eq!(days_from_civil(2000, 2, 29), Some(11_016));
        assert_eq!(days_from_civil(2000, 3, 1), Some(11_017));
        assert_eq!(days_from_civil(2024, 2, 29), Some(19_782));
        assert_eq!(days_from_civil(2100, 2, 28), Some(47_540));
        assert_eq!(days_from_civil(2100, 3, 1), Some(47_541));
        assert_eq!(days_from_civil(1600, 1, 1), Some(-135_140));
        assert_eq!(days_from_civil(9999, 12, 31), Some(2_932_896));
    }

    #[test]
    fn days_from_civil_refuses_impossible_dates() {
        assert_eq!(days_from_civil(2100, 2, 29), None); // 2100 is not a leap year
        assert_eq!(days_from_civil(1900, 2, 29), None);
        assert_eq!(days_from_civil(2023, 4, 31), None);
        assert_eq!(days_from_civil(2023, 13, 1), None);
        assert_eq!(days_from_civil(2023, 0, 1), None);
        assert_eq!(days_from_civil(2023, 1, 0), None);
    }

    #[test]
    fn civil_from_days_at_boundaries() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(10_957), (2000, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(47_540), (2100, 2, 28));
        assert_eq!(civil_from_days(47_541), (2100, 3, 1));
        assert_eq!(civil_from_days(-135_140), (1600, 1, 1));
        assert_eq!(civil_from_days(2_932_896), (9999, 12, 31));
    }

    #[test]
    fn civil_conversion_round_trips_every_day_from_1599_to_2401() {
        let first = days_from_civil(1599, 1, 1).unwrap();
        let last = days_from_civil(2401, 12, 31).unwrap();

        let mismatches: Vec<i64> = (first..=last)
            .filter(|&days| {
                let (y, m, d) = civil_from_days(days);
                days_from_civil(y, m, d) != Some(days)
            })
            .collect();

        assert!(
            mismatches.is_empty(),
            "first mismatches: {:?}",
            &mismatches[..5.min(mismatches.len())]
        );
        assert_eq!(last - first + 1, 803 * 365 + 195); // 195 leap days from 1599 to 2401
    }

    #[test]
    fn weekday_follows_the_date() {
        assert_eq!(date_time_from_unix(0).weekday, 5); // Thursday
        assert_eq!(date_time_from_unix(10_957 * SECS_PER_DAY).weekday, 7); // 2000-01-01 Saturday
        assert_eq!(date_time_from_unix(47_541 * SECS_PER_DAY).weekday, 2); // 2100-03-01 Monday
        assert_eq!(date_time_from_unix(-SECS_PER_DAY).weekday, 4); // 1969-12-31 Wednesday
    }
}
