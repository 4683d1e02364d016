//! The bandwidth budget of an inter-site link: a default rate and time
//! windows (e.g. a fifth of the link in office hours), evaluated on local
//! wall-clock time in the deployment's timezone, and its fair share among
//! the replications running over the link.

use chrono::{Datelike, Timelike};

/// A rate that applies on some days between two local times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Monday first.
    pub days: [bool; 7],
    /// Minutes after local midnight; `to` before `from` wraps past midnight.
    pub from: u32,
    pub to: u32,
    /// Bytes per second.
    pub rate: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkBudget {
    /// Bytes per second outside every window; None: unlimited.
    pub rate: Option<u64>,
    /// The first window that holds wins.
    pub windows: Vec<Window>,
}

impl Window {
    fn holds(&self, weekday: usize, minute: u32) -> bool {
        if self.from <= self.to {
            self.days[weekday] && (self.from..self.to).contains(&minute)
        } else {
            // 22:00-06:00: the evening part belongs to the day it starts.
            (self.days[weekday] && minute >= self.from) || (self.days[(weekday + 6) % 7] && minute < self.to)
        }
    }
}

impl LinkBudget {
    /// The link's rate at local time `at`.
    pub fn rate_at<Tz: chrono::TimeZone>(&self, at: &chrono::DateTime<Tz>) -> Option<u64> {
        let weekday = at.weekday().num_days_from_monday() as usize;
        let minute = at.hour() * 60 + at.minute();
        self.windows
            .iter()
            .find(|w| w.holds(weekday, minute))
            .map(|w| w.rate)
            .or(self.rate)
    }
}

/// One transfer's rate: an equal share of the link among the `running`
/// transfers over it, and never more than the job's own limit.
pub fn share(link: Option<u64>, running: usize, job_limit: Option<u64>) -> Option<u64> {
    let fair = link.map(|rate| (rate / running.max(1) as u64).max(1));
    match (fair, job_limit) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses `mon-fri`, `sat,sun`, `mon,wed-fri`, `*`.
pub fn parse_days(text: &str) -> Result<[bool; 7], String> {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let day = |name: &str| {
        NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| format!("{name:?} is not a day (mon, tue, wed, thu, fri, sat, sun)"))
    };
    let mut days = [false; 7];
    if text.trim() == "*" {
        return Ok([true; 7]);
    }
    for part in text.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    days[d] = true;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[day(part)?] = true,
        }
    }
    Ok(days)
}

/// Parses `HH:MM` (24:00 allowed as the end of the day) into minutes.
pub fn parse_clock(text: &str) -> Result<u32, String> {
    let bad = || format!("{text:?} is not a time of day such as 08:00");
    let (h, m) = text.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m >= 60 || h > 24 || (h == 24 && m > 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn office_hours() -> LinkBudget {
        LinkBudget {
            rate: Some(100),
            windows: vec![Window {
                days: parse_days("mon-fri").expect("days"),
                from: parse_clock("08:00").expect("from"),
                to: parse_clock("18:00").expect("to"),
                rate: 20,
            }],
        }
    }

    #[test]
    fn windows_apply_on_their_days_and_hours_in_local_time() {
        let tz = chrono_tz::Asia::Ho_Chi_Minh;
        let link = office_hours();
        // Friday 2026-11-27.
        let at = |h, m| tz.with_ymd_and_hms(2026, 11, 27, h, m, 0).single().expect("time");
        assert_eq!(link.rate_at(&at(7, 59)), Some(100));
        assert_eq!(link.rate_at(&at(8, 0)), Some(20));
        assert_eq!(link.rate_at(&at(17, 59)), Some(20));
        assert_eq!(link.rate_at(&at(18, 0)), Some(100));
        let saturday = tz.with_ymd_and_hms(2026, 11, 28, 10, 0, 0).single().expect("time");
        assert_eq!(link.rate_at(&saturday), Some(100));
        // 10:00 in Ho Chi Minh City is 03:00 UTC: the window follows the zone.
        let utc = chrono::Utc
            .with_ymd_and_hms(2026, 11, 27, 3, 0, 0)
            .single()
            .expect("utc");
        assert_eq!(link.rate_at(&utc.with_timezone(&tz)), Some(20));
        assert_eq!(link.rate_at(&utc), Some(100));
    }

    #[test]
    fn a_night_window_wraps_past_midnight() {
        let night = LinkBudget {
            rate: Some(10),
            windows: vec![Window {
                days: parse_days("fri").expect("days"),
                from: parse_clock("22:00").expect("from"),
                to: parse_clock("06:00").expect("to"),
                rate: 1000,
            }],
        };
        let tz = chrono_tz::UTC;
        let at = |d, h| tz.with_ymd_and_hms(2026, 11, d, h, 0, 0).single().expect("time");
        assert_eq!(night.rate_at(&at(27, 23)), Some(1000), "Friday night");
        assert_eq!(night.rate_at(&at(28, 5)), Some(1000), "its Saturday morning");
        assert_eq!(night.rate_at(&at(28, 23)), Some(10), "not Saturday night");
        assert_eq!(night.rate_at(&at(27, 5)), Some(10), "not Friday morning");
    }

    #[test]
    fn transfers_share_the_link_within_their_own_limits() {
        assert_eq!(share(Some(100), 4, None), Some(25));
        assert_eq!(share(Some(100), 2, Some(10)), Some(10));
        assert_eq!(share(None, 3, Some(10)), Some(10));
        assert_eq!(share(None, 3, None), None);
        assert_eq!(share(Some(100), 0, None), Some(100));
    }

    #[test]
    fn days_and_clocks_parse_or_say_why_not() {
        assert_eq!(
            parse_days("sat,sun").expect("weekend"),
            [false, false, false, false, false, true, true]
        );
        assert_eq!(
            parse_days("fri-mon").expect("wrap"),
            [true, false, false, false, true, true, true]
        );
        assert!(parse_days("funday").unwrap_err().contains("is not a day"));
        assert_eq!(parse_clock("24:00"), Ok(1440));
        assert!(parse_clock("8h").is_err());
        assert!(parse_clock("25:00").is_err());
    }
}
