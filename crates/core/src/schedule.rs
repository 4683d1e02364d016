//! Cron schedules as administrators write them, evaluated in the
//! deployment's timezone.
//!
//! The `cron` crate is not crontab: it wants a seconds field, numbers
//! weekdays 1-7 with 1 = Sunday, and requires day-of-month AND day-of-week
//! to match. Crontab numbers 0-7 with 0 and 7 = Sunday and 1 = Monday, and
//! when both day fields are restricted it fires when EITHER matches. So we
//! translate explicitly:
//! - weekday numbers always follow crontab (also in the 6/7-field forms),
//!   and are rewritten as an explicit list in the crate's numbering;
//! - when both day fields are restricted (neither starts with `*`, as in
//!   Vixie cron), two crate schedules are kept, one per day field, and the
//!   next fire is the earlier of the two.
//!
//! Daylight saving time: schedules are matched against local wall-clock
//! time. A local time that occurs twice (clocks go back) fires once, at its
//! first occurrence; a local time that does not exist (clocks go forward)
//! fires once, shifted later by the length of the gap (02:30 in a 02:00 to
//! 03:00 gap fires at 03:30). A daily job therefore fires exactly once per
//! local day.

use std::str::FromStr;

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    source: String,
    /// One crate schedule, or two whose union is the crontab meaning.
    parts: Vec<cron::Schedule>,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

const WEEKDAY_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// Expands a crontab weekday field (`1-5`, `mon,wed`, `*/2`, `5-7`, `0`)
/// into the `cron` crate's numbering (1 = Sunday) as an explicit list.
fn translate_weekdays(field: &str) -> Result<String, String> {
    let number = |text: &str| -> Result<u32, String> {
        let lower = text.to_ascii_lowercase();
        if let Some(i) = WEEKDAY_NAMES.iter().position(|n| *n == lower) {
            return Ok(i as u32);
        }
        match text.parse::<u32>() {
            Ok(n) if n <= 7 => Ok(n % 7),
            _ => Err(format!("day of week {text:?} is not 0-7 or a name such as mon")),
        }
    };
    let mut days = [false; 7];
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("step {step:?} in day of week is not a positive number"))?;
                (range, step)
            }
            None => (item, 1),
        };
        let (start, end) = if range == "*" {
            (0, 6)
        } else if let Some((a, b)) = range.split_once('-') {
            // 7 as the end of a range means Sunday at the end: 5-7 is Fri-Sun.
            let start = number(a)?;
            let end = if b == "7" { 7 } else { number(b)? };
            if end < start {
                return Err(format!("day-of-week range {range:?} runs backwards"));
            }
            (start, end)
        } else {
            let n = number(range)?;
            (n, if step > 1 { 6 } else { n })
        };
        let mut day = start;
        while day <= end {
            days[(day % 7) as usize] = true;
            day += step;
        }
    }
    let list: Vec<String> = (0..7).filter(|d| days[*d]).map(|d| (d + 1).to_string()).collect();
    Ok(list.join(","))
}

impl Schedule {
    /// Parses `30 2 * * *` (crontab), `0 30 2 * * *` / `0 30 2 * * * 2027`
    /// (with seconds, and a year), or `@hourly`, `@daily`, `@weekly`,
    /// `@monthly`, `@yearly`.
    pub fn parse(expression: &str) -> Result<Schedule, String> {
        let trimmed = expression.trim();
        let expanded = match trimmed {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other if other.starts_with('@') => {
                return Err(format!(
                    "{other:?} is not supported; use @hourly, @daily, @weekly, @monthly, @yearly or a cron expression"
                ))
            }
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        // seconds, minutes, hours, day of month, month, day of week, year
        let (seconds, rest, year) = match fields.len() {
            5 => ("0", &fields[..], "*"),
            6 => (fields[0], &fields[1..], "*"),
            7 => (fields[0], &fields[1..6], fields[6]),
            n => {
                return Err(format!(
                    "{expression:?} has {n} fields; write 5 (minute hour day-of-month month day-of-week), 6 (with seconds first) or 7 (and a year)"
                ))
            }
        };
        let (minutes, hours, dom, month, dow) = (rest[0], rest[1], rest[2], rest[3], rest[4]);
        if dom == "?" || dow == "?" {
            return Err("`?` is not crontab; use `*`".into());
        }
        let weekdays = translate_weekdays(dow)?;
        let build = |dom: &str, dow: &str| -> Result<cron::Schedule, String> {
            let text = format!("{seconds} {minutes} {hours} {dom} {month} {dow} {year}");
            cron::Schedule::from_str(&text).map_err(|e| format!("{expression:?} is not a valid schedule: {e}"))
        };
        let both_restricted = !dom.starts_with('*') && !dow.starts_with('*');
        let parts = if both_restricted {
            // Crontab: either day field matching is enough.
            vec![build(dom, "*")?, build("*", &weekdays)?]
        } else {
            vec![build(dom, &weekdays)?]
        };
        Ok(Schedule {
            source: trimmed.to_string(),
            parts,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The first fire strictly after `after`, evaluated in `tz`.
    pub fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        self.parts.iter().filter_map(|part| next_of(part, after, tz)).min()
    }

    /// The next `count` fires after `after`.
    pub fn upcoming(&self, after: DateTime<Utc>, tz: Tz, count: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(count);
        let mut cursor = after;
        while out.len() < count {
            match self.next_after(cursor, tz) {
                Some(next) => {
                    out.push(next);
                    cursor = next;
                }
                None => break,
            }
        }
        out
    }
}

/// Maps a local wall-clock time to an instant: the first occurrence of a
/// repeated time, and a time in a gap shifted by the gap's length.
fn resolve_local(naive: NaiveDateTime, tz: Tz) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&naive) {
        LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(earlier, _) => Some(earlier.with_timezone(&Utc)),
        LocalResult::None => {
            // Use the offset in force just before the gap.
            let probe = naive - chrono::Duration::hours(3);
            let before = match tz.from_local_datetime(&probe) {
                LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t,
                LocalResult::None => return None,
            };
            let offset = chrono::offset::Offset::fix(before.offset());
            let utc = naive - chrono::Duration::seconds(i64::from(offset.local_minus_utc()));
            Some(Utc.from_utc_datetime(&utc))
        }
    }
}

fn next_of(schedule: &cron::Schedule, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
    // Walk wall-clock times (a naive time treated as UTC, so the crate sees
    // no transitions), then map each to an instant; a wall-clock time after
    // ours can map before our instant in a repeated hour, so skip those.
    let local = after.with_timezone(&tz).naive_local();
    let start = Utc.from_utc_datetime(&(local - chrono::Duration::hours(2)));
    schedule
        .after(&start)
        .take(10_000)
        .filter_map(|candidate| resolve_local(candidate.naive_utc(), tz))
        .find(|instant| *instant > after)
}

/// Parses an IANA timezone name such as `Asia/Ho_Chi_Minh`.
pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>()
        .map_err(|_| format!("{name:?} is not an IANA timezone name such as UTC, Europe/Berlin or Asia/Ho_Chi_Minh"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, Weekday};

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).expect("time").with_timezone(&Utc)
    }

    fn local(t: DateTime<Utc>, tz: Tz) -> String {
        t.with_timezone(&tz).format("%a %Y-%m-%d %H:%M:%S %Z").to_string()
    }

    fn next_local(expr: &str, after: &str, tz: Tz, n: usize) -> Vec<String> {
        let schedule = Schedule::parse(expr).expect(expr);
        schedule
            .upcoming(utc(after), tz, n)
            .into_iter()
            .map(|t| local(t, tz))
            .collect()
    }

    /// Pins the crate's own behaviour that the translation relies on.
    #[test]
    fn the_cron_crate_is_not_crontab() {
        let crate_schedule = cron::Schedule::from_str("0 30 2 * * 1").expect("parse");
        let next = crate_schedule.after(&utc("2026-11-27T00:00:00Z")).next().expect("next");
        // 1 is Sunday for the crate.
        assert_eq!(next.weekday(), Weekday::Sun);
        // Both day fields must match for the crate: the 1st that is a Monday.
        let both = cron::Schedule::from_str("0 0 0 1 * 2").expect("parse");
        let next = both.after(&utc("2026-11-27T00:00:00Z")).next().expect("next");
        assert_eq!((next.day(), next.weekday()), (1, Weekday::Mon));
        // And it wants a seconds field: five fields do not parse.
        assert!(cron::Schedule::from_str("30 2 * * 1").is_err());
    }

    #[test]
    fn crontab_table() {
        let tz = chrono_tz::UTC;
        // (expression, after, the next fires)
        let table: &[(&str, &str, &[&str])] = &[
            (
                "30 2 * * 1",
                "2026-11-27T00:00:00Z",
                &["Mon 2026-11-30 02:30:00 UTC", "Mon 2026-12-07 02:30:00 UTC"],
            ),
            ("30 2 * * 0", "2026-11-27T00:00:00Z", &["Sun 2026-11-29 02:30:00 UTC"]),
            ("30 2 * * 7", "2026-11-27T00:00:00Z", &["Sun 2026-11-29 02:30:00 UTC"]),
            (
                "0 12 * * mon-fri",
                "2026-11-27T13:00:00Z",
                &["Mon 2026-11-30 12:00:00 UTC", "Tue 2026-12-01 12:00:00 UTC"],
            ),
            (
                "0 0 * * 5-7",
                "2026-11-27T01:00:00Z",
                &[
                    "Sat 2026-11-28 00:00:00 UTC",
                    "Sun 2026-11-29 00:00:00 UTC",
                    "Fri 2026-12-04 00:00:00 UTC",
                ],
            ),
            (
                "0 0 * * */2",
                "2026-11-27T01:00:00Z",
                &[
                    "Sat 2026-11-28 00:00:00 UTC",
                    "Sun 2026-11-29 00:00:00 UTC",
                    "Tue 2026-12-01 00:00:00 UTC",
                ],
            ),
            // Both day fields restricted: the 1st of the month OR a Monday.
            (
                "0 0 1 * 1",
                "2026-11-27T00:00:00Z",
                &[
                    "Mon 2026-11-30 00:00:00 UTC",
                    "Tue 2026-12-01 00:00:00 UTC",
                    "Mon 2026-12-07 00:00:00 UTC",
                ],
            ),
            // A star-step day of month means AND, as in Vixie cron.
            ("0 0 */10 * 1", "2026-11-01T00:00:00Z", &["Mon 2026-12-21 00:00:00 UTC"]),
            (
                "*/15 * * * *",
                "2026-11-27T10:07:00Z",
                &["Fri 2026-11-27 10:15:00 UTC", "Fri 2026-11-27 10:30:00 UTC"],
            ),
            ("@hourly", "2026-11-27T10:07:00Z", &["Fri 2026-11-27 11:00:00 UTC"]),
            ("@daily", "2026-11-27T10:07:00Z", &["Sat 2026-11-28 00:00:00 UTC"]),
            ("@weekly", "2026-11-27T10:07:00Z", &["Sun 2026-11-29 00:00:00 UTC"]),
            // With seconds, and weekday numbers still crontab's.
            (
                "15 30 2 * * 1",
                "2026-11-27T00:00:00Z",
                &["Mon 2026-11-30 02:30:15 UTC"],
            ),
            (
                "0 0 0 1 1 * 2028",
                "2026-11-27T00:00:00Z",
                &["Sat 2028-01-01 00:00:00 UTC"],
            ),
        ];
        for (expr, after, want) in table {
            assert_eq!(next_local(expr, after, tz, want.len()), *want, "{expr}");
        }
    }

    #[test]
    fn invalid_expressions_say_why() {
        for (expr, why) in [
            ("30 2 * *", "has 4 fields"),
            ("61 2 * * *", "not a valid schedule"),
            ("0 0 * * 8", "day of week \"8\""),
            ("@reboot", "not supported"),
            ("0 0 ? * 1", "`?` is not crontab"),
            ("0 0 * * 5-2", "runs backwards"),
        ] {
            let err = Schedule::parse(expr).expect_err(expr);
            assert!(err.contains(why), "{expr}: {err}");
        }
    }

    #[test]
    fn evaluated_in_the_deployment_timezone() {
        let tz = parse_timezone("Asia/Ho_Chi_Minh").expect("tz");
        // 02:30 in Ho Chi Minh City (UTC+7) is 19:30 UTC the day before.
        let next = Schedule::parse("30 2 * * 1")
            .expect("parse")
            .next_after(utc("2026-11-27T00:00:00Z"), tz)
            .expect("next");
        assert_eq!(next, utc("2026-11-29T19:30:00Z"));
        assert_eq!(local(next, tz), "Mon 2026-11-30 02:30:00 +07");
        assert!(parse_timezone("Mars/Olympus_Mons").is_err());
    }

    #[test]
    fn daylight_saving_gap_fires_once_shifted_by_the_gap() {
        // Europe/Berlin springs forward on 2027-03-28: 02:00 -> 03:00.
        let tz = parse_timezone("Europe/Berlin").expect("tz");
        let fires = next_local("30 2 * * *", "2027-03-26T12:00:00Z", tz, 4);
        assert_eq!(
            fires,
            [
                "Sat 2027-03-27 02:30:00 CET",
                "Sun 2027-03-28 03:30:00 CEST",
                "Mon 2027-03-29 02:30:00 CEST",
                "Tue 2027-03-30 02:30:00 CEST"
            ]
        );
    }

    #[test]
    fn daylight_saving_repeated_hour_fires_once() {
        // Europe/Berlin falls back on 2027-10-31: 03:00 -> 02:00.
        let tz = parse_timezone("Europe/Berlin").expect("tz");
        let fires = next_local("30 2 * * *", "2027-10-29T12:00:00Z", tz, 3);
        assert_eq!(
            fires,
            [
                "Sat 2027-10-30 02:30:00 CEST",
                "Sun 2027-10-31 02:30:00 CEST",
                "Mon 2027-11-01 02:30:00 CET"
            ]
        );
        // Every 30 minutes through the repeated hour: the wall-clock times
        // 02:00 and 02:30 fire once each, at their first occurrence.
        let fires = next_local("*/30 * * * *", "2027-10-30T23:10:00Z", tz, 5);
        assert_eq!(
            fires,
            [
                "Sun 2027-10-31 01:30:00 CEST",
                "Sun 2027-10-31 02:00:00 CEST",
                "Sun 2027-10-31 02:30:00 CEST",
                "Sun 2027-10-31 03:00:00 CET",
                "Sun 2027-10-31 03:30:00 CET"
            ]
        );
    }
}
