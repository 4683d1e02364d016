//! Retention: which backups (or replicated snapshots) to keep and which to
//! delete, given a policy such as "the last 3, one per day for a week, one
//! per week for a month, one per month for a year".
//!
//! The rules work like restic's `forget`:
//! - Each rule picks items on its own, and an item is kept if ANY rule picks
//!   it (the union). Rules do not share a budget: with `keep_daily: 7` and
//!   `keep_weekly: 4`, the newest item is typically picked by both, and the
//!   weekly rule still picks 4 weeks.
//! - `keep_last: N` keeps the N newest items.
//! - `keep_hourly: N` looks at the N most recent hours THAT HAVE AT LEAST ONE
//!   ITEM and keeps the newest item of each. Hours without items do not
//!   count: if backups stopped for a week, `keep_daily: 7` still keeps 7
//!   backups, reaching further back.
//! - `keep_daily`, `keep_weekly`, `keep_monthly` and `keep_yearly` work the
//!   same way with calendar days, ISO weeks (Monday to Sunday), calendar
//!   months and calendar years.
//! - Hours, days, weeks, months and years are those of the deployment's
//!   timezone, not UTC: a backup at 23:30 local time belongs to that local
//!   day even when it is already the next day in UTC. Daylight saving time
//!   follows the wall clock: the day clocks change is one day (23 or 25
//!   hours long), and when clocks go back the repeated hour (e.g. 02:00 to
//!   03:00 twice) is ONE hour bucket, so one item is kept for it.
//! - The newest item is always kept, whatever the policy (reason `newest`),
//!   so retention never deletes the latest backup.
//! - A policy whose counts are all zero (nothing configured) keeps
//!   everything (reason `no-policy`): no policy means no deletion.
//! - A protected item (not yet copied to the other site, being verified, ...)
//!   is never deleted. If the policy would delete it, it is reported as
//!   blocked instead; it is deleted on a later run once no longer protected
//!   and still not picked. Protected items do not change what the rules pick:
//!   a protected item counts like any other for "the N newest".
//!
//! Items are ordered by their time; items with the same time are ordered by
//! their position in the input, a later position counting as newer (inputs
//! are usually in creation order). Times are taken as given: an item stamped
//! in the future by a wrong clock counts as the newest. All output lists are
//! newest first.

use std::collections::HashSet;
use std::fmt;

use chrono::{DateTime, Datelike, NaiveDateTime, Timelike, Utc};
use chrono_tz::Tz;

/// How many items to keep per rule; see the module documentation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_yearly: u32,
}

impl RetentionPolicy {
    /// True when no rule is configured (all counts zero): nothing is deleted.
    pub fn keeps_everything(&self) -> bool {
        *self == Self::default()
    }
}

/// One item under retention (a backup's artifacts, a snapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item<K> {
    pub key: K,
    pub time: DateTime<Utc>,
    /// May not be deleted whatever the policy says (e.g. not yet copied to
    /// the other site, or being read by a verify).
    pub protected: bool,
}

/// Why an item is kept. An item may have several reasons; they are listed
/// in the order of this enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeepReason {
    /// Among the `keep_last` newest items.
    Last,
    /// Newest item of one of the `keep_hourly` most recent local hours.
    Hourly,
    /// Newest item of one of the `keep_daily` most recent local days.
    Daily,
    /// Newest item of one of the `keep_weekly` most recent ISO weeks.
    Weekly,
    /// Newest item of one of the `keep_monthly` most recent months.
    Monthly,
    /// Newest item of one of the `keep_yearly` most recent years.
    Yearly,
    /// The newest item, which is always kept.
    Newest,
    /// No rule is configured, so everything is kept.
    NoPolicy,
}

impl KeepReason {
    /// Lower-case name for logs and the API: `last`, `hourly`, ..., `newest`,
    /// `no-policy`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeepReason::Last => "last",
            KeepReason::Hourly => "hourly",
            KeepReason::Daily => "daily",
            KeepReason::Weekly => "weekly",
            KeepReason::Monthly => "monthly",
            KeepReason::Yearly => "yearly",
            KeepReason::Newest => "newest",
            KeepReason::NoPolicy => "no-policy",
        }
    }
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Kept, for these reasons (never empty).
    Keep(Vec<KeepReason>),
    /// Not picked by any rule and not protected: to be deleted.
    Delete,
    /// Not picked by any rule, but protected: the policy would delete it.
    Blocked,
}

/// The outcome for a whole set of items; each list is newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<K> {
    pub keep: Vec<(K, Vec<KeepReason>)>,
    pub delete: Vec<K>,
    pub blocked: Vec<K>,
}

/// Indices of `items`, newest first; equal times: later input position first.
fn newest_first<K>(items: &[Item<K>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| items[b].time.cmp(&items[a].time).then(b.cmp(&a)));
    order
}

/// Bucket keys: equal for two local times in the same hour/day/week/...
fn hour_key(t: &NaiveDateTime) -> i64 {
    i64::from(t.date().num_days_from_ce()) * 24 + i64::from(t.hour())
}
fn day_key(t: &NaiveDateTime) -> i64 {
    i64::from(t.date().num_days_from_ce())
}
fn week_key(t: &NaiveDateTime) -> i64 {
    let week = t.date().iso_week();
    i64::from(week.year()) * 100 + i64::from(week.week())
}
fn month_key(t: &NaiveDateTime) -> i64 {
    i64::from(t.year()) * 12 + i64::from(t.month0())
}
fn year_key(t: &NaiveDateTime) -> i64 {
    i64::from(t.year())
}

/// Decides each item; the result is in the order of `items`.
pub fn decide<K>(policy: &RetentionPolicy, items: &[Item<K>], tz: Tz) -> Vec<Decision> {
    let order = newest_first(items);
    let mut reasons: Vec<Vec<KeepReason>> = vec![Vec::new(); items.len()];

    if policy.keeps_everything() {
        for r in &mut reasons {
            r.push(KeepReason::NoPolicy);
        }
    } else {
        for &i in order.iter().take(policy.keep_last as usize) {
            reasons[i].push(KeepReason::Last);
        }
        let local: Vec<NaiveDateTime> = items
            .iter()
            .map(|it| it.time.with_timezone(&tz).naive_local())
            .collect();
        type KeyFn = fn(&NaiveDateTime) -> i64;
        let rules: [(u32, KeepReason, KeyFn); 5] = [
            (policy.keep_hourly, KeepReason::Hourly, hour_key),
            (policy.keep_daily, KeepReason::Daily, day_key),
            (policy.keep_weekly, KeepReason::Weekly, week_key),
            (policy.keep_monthly, KeepReason::Monthly, month_key),
            (policy.keep_yearly, KeepReason::Yearly, year_key),
        ];
        for (count, reason, key) in rules {
            let count = count as usize;
            // Going newest first, the first item seen in a bucket is the
            // newest of that bucket. A set rather than "differs from the
            // previous bucket", so that a local clock going back across a
            // bucket boundary cannot make one bucket count twice.
            let mut seen = HashSet::new();
            for &i in &order {
                if seen.len() >= count {
                    break;
                }
                if seen.insert(key(&local[i])) {
                    reasons[i].push(reason);
                }
            }
        }
    }
    if let Some(&newest) = order.first() {
        reasons[newest].push(KeepReason::Newest);
    }

    reasons
        .into_iter()
        .zip(items)
        .map(|(mut r, item)| {
            if !r.is_empty() {
                r.sort();
                Decision::Keep(r)
            } else if item.protected {
                Decision::Blocked
            } else {
                Decision::Delete
            }
        })
        .collect()
}

/// Plans retention for `items` under `policy`, with calendar buckets in the
/// timezone `tz` (see the module documentation).
pub fn plan<K: Clone>(policy: &RetentionPolicy, items: &[Item<K>], tz: Tz) -> Plan<K> {
    let mut decisions: Vec<Option<Decision>> = decide(policy, items, tz).into_iter().map(Some).collect();
    let mut plan = Plan {
        keep: Vec::new(),
        delete: Vec::new(),
        blocked: Vec::new(),
    };
    for i in newest_first(items) {
        let key = items[i].key.clone();
        match decisions[i].take() {
            Some(Decision::Keep(reasons)) => plan.keep.push((key, reasons)),
            Some(Decision::Delete) => plan.delete.push(key),
            Some(Decision::Blocked) => plan.blocked.push(key),
            None => {}
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use KeepReason::*;

    const UTC: Tz = chrono_tz::UTC;

    fn at(rfc3339: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc3339).unwrap().with_timezone(&Utc)
    }

    /// Items keyed by their time string, unprotected.
    fn items_at(times: &[&'static str]) -> Vec<Item<&'static str>> {
        times
            .iter()
            .map(|&t| Item {
                key: t,
                time: at(t),
                protected: false,
            })
            .collect()
    }

    fn kept<K: Clone>(plan: &Plan<K>) -> Vec<K> {
        plan.keep.iter().map(|(k, _)| k.clone()).collect()
    }

    #[test]
    fn daily_weekly_monthly_over_a_month() {
        // One backup a day at 12:00 UTC, 2024-02-10 .. 2024-03-10 (a Sunday).
        let times: Vec<String> = (10..=29)
            .map(|d| format!("2024-02-{d:02}T12:00:00Z"))
            .chain((1..=10).map(|d| format!("2024-03-{d:02}T12:00:00Z")))
            .collect();
        let items: Vec<Item<String>> = times
            .iter()
            .map(|t| Item {
                key: t[..10].to_string(),
                time: at(t),
                protected: false,
            })
            .collect();
        let policy = RetentionPolicy {
            keep_daily: 7,
            keep_weekly: 4,
            keep_monthly: 2,
            ..Default::default()
        };
        let plan = plan(&policy, &items, UTC);
        let expected: Vec<(String, Vec<KeepReason>)> = [
            ("2024-03-10", vec![Daily, Weekly, Monthly, Newest]),
            ("2024-03-09", vec![Daily]),
            ("2024-03-08", vec![Daily]),
            ("2024-03-07", vec![Daily]),
            ("2024-03-06", vec![Daily]),
            ("2024-03-05", vec![Daily]),
            ("2024-03-04", vec![Daily]),
            ("2024-03-03", vec![Weekly]), // Sunday of the week of 26 Feb
            ("2024-02-29", vec![Monthly]),
            ("2024-02-25", vec![Weekly]),
            ("2024-02-18", vec![Weekly]),
        ]
        .into_iter()
        .map(|(k, r)| (k.to_string(), r))
        .collect();
        assert_eq!(plan.keep, expected);
        assert_eq!(plan.delete.len(), 30 - 11);
        assert_eq!(plan.delete.first().map(String::as_str), Some("2024-03-02"));
        assert_eq!(plan.delete.last().map(String::as_str), Some("2024-02-10"));
        assert!(plan.blocked.is_empty());
    }

    #[test]
    fn keep_last_only_with_unordered_input() {
        let items = items_at(&[
            "2024-05-03T00:00:00Z",
            "2024-05-05T00:00:00Z",
            "2024-05-01T00:00:00Z",
            "2024-05-04T00:00:00Z",
            "2024-05-02T00:00:00Z",
        ]);
        let policy = RetentionPolicy {
            keep_last: 3,
            ..Default::default()
        };
        let plan = plan(&policy, &items, UTC);
        assert_eq!(
            plan.keep,
            vec![
                ("2024-05-05T00:00:00Z", vec![Last, Newest]),
                ("2024-05-04T00:00:00Z", vec![Last]),
                ("2024-05-03T00:00:00Z", vec![Last]),
            ]
        );
        assert_eq!(plan.delete, vec!["2024-05-02T00:00:00Z", "2024-05-01T00:00:00Z"]);
        assert!(plan.blocked.is_empty());
    }

    #[test]
    fn protected_items_are_blocked_not_deleted() {
        let mut items = items_at(&[
            "2024-05-01T00:00:00Z",
            "2024-05-02T00:00:00Z",
            "2024-05-03T00:00:00Z",
            "2024-05-04T00:00:00Z",
        ]);
        items[1].protected = true; // e.g. not yet replicated
        items[3].protected = true; // protected AND kept: simply kept
        let policy = RetentionPolicy {
            keep_last: 1,
            ..Default::default()
        };
        let plan = plan(&policy, &items, UTC);
        assert_eq!(kept(&plan), vec!["2024-05-04T00:00:00Z"]);
        assert_eq!(plan.blocked, vec!["2024-05-02T00:00:00Z"]);
        assert_eq!(plan.delete, vec!["2024-05-03T00:00:00Z", "2024-05-01T00:00:00Z"]);
        assert_eq!(
            decide(&policy, &items, UTC),
            vec![
                Decision::Delete,
                Decision::Blocked,
                Decision::Delete,
                Decision::Keep(vec![Last, Newest])
            ]
        );
    }

    #[test]
    fn newest_is_always_kept_and_ties_follow_input_order() {
        // Two items share the newest time: the later one in the input counts
        // as newer. keep_yearly picks one item only, so the other goes.
        let items = items_at(&[
            "2023-06-01T00:00:00Z",
            "2024-06-01T00:00:00Z",
            "2024-06-01T00:00:00+00:00",
        ]);
        let policy = RetentionPolicy {
            keep_yearly: 1,
            ..Default::default()
        };
        let plan = plan(&policy, &items, UTC);
        assert_eq!(plan.keep, vec![("2024-06-01T00:00:00+00:00", vec![Yearly, Newest])]);
        assert_eq!(plan.delete, vec!["2024-06-01T00:00:00Z", "2023-06-01T00:00:00Z"]);
        // Whatever the policy, the newest item is in the plan's keep list.
        for policy in [
            RetentionPolicy::default(),
            RetentionPolicy {
                keep_last: 1,
                ..Default::default()
            },
            RetentionPolicy {
                keep_monthly: 1,
                ..Default::default()
            },
        ] {
            let plan = super::plan(&policy, &items, UTC);
            let (key, reasons) = &plan.keep[0];
            assert_eq!(*key, "2024-06-01T00:00:00+00:00");
            assert!(reasons.contains(&Newest), "{policy:?}: {reasons:?}");
        }
    }

    #[test]
    fn berlin_dst_day_is_one_local_day() {
        // 2024-10-27: clocks go back 03:00 CEST -> 02:00 CET; the day is 25 hours long.
        let berlin = chrono_tz::Europe::Berlin;
        let items = items_at(&[
            "2024-10-26T21:59:00Z", // 26 Oct 23:59 CEST
            "2024-10-26T22:00:00Z", // 27 Oct 00:00 CEST
            "2024-10-27T22:59:00Z", // 27 Oct 23:59 CET, 25 h later: same local day
        ]);
        let policy = RetentionPolicy {
            keep_daily: 2,
            ..Default::default()
        };
        let plan = plan(&policy, &items, berlin);
        assert_eq!(kept(&plan), vec!["2024-10-27T22:59:00Z", "2024-10-26T21:59:00Z"]);
        assert_eq!(plan.delete, vec!["2024-10-26T22:00:00Z"]);
        // In UTC the days split differently.
        let plan = super::plan(&policy, &items, UTC);
        assert_eq!(kept(&plan), vec!["2024-10-27T22:59:00Z", "2024-10-26T22:00:00Z"]);

        // 2024-03-31: clocks go forward 02:00 CET -> 03:00 CEST; a 23-hour day.
        let items = items_at(&[
            "2024-03-30T22:59:00Z", // 30 Mar 23:59 CET
            "2024-03-30T23:00:00Z", // 31 Mar 00:00 CET
            "2024-03-31T21:59:00Z", // 31 Mar 23:59 CEST, 23 h later: same local day
            "2024-03-31T22:00:00Z", // 1 Apr 00:00 CEST
        ]);
        let plan = super::plan(&policy, &items, berlin);
        assert_eq!(kept(&plan), vec!["2024-03-31T22:00:00Z", "2024-03-31T21:59:00Z"]);
        assert_eq!(plan.delete, vec!["2024-03-30T23:00:00Z", "2024-03-30T22:59:00Z"]);
    }

    #[test]
    fn berlin_dst_hourly_follows_the_wall_clock() {
        let berlin = chrono_tz::Europe::Berlin;
        let policy = RetentionPolicy {
            keep_hourly: 2,
            ..Default::default()
        };
        // Clocks go back: 02:30 CEST and 02:30 CET are the same wall-clock hour.
        let items = items_at(&[
            "2024-10-27T00:30:00Z", // 02:30 CEST
            "2024-10-27T01:30:00Z", // 02:30 CET
            "2024-10-27T02:30:00Z", // 03:30 CET
        ]);
        let plan = plan(&policy, &items, berlin);
        assert_eq!(kept(&plan), vec!["2024-10-27T02:30:00Z", "2024-10-27T01:30:00Z"]);
        assert_eq!(plan.delete, vec!["2024-10-27T00:30:00Z"]);
        // Clocks go forward: 01:xx CET is directly followed by 03:xx CEST.
        let items = items_at(&[
            "2024-03-31T00:10:00Z", // 01:10 CET
            "2024-03-31T00:50:00Z", // 01:50 CET
            "2024-03-31T01:10:00Z", // 03:10 CEST
        ]);
        let plan = super::plan(&policy, &items, berlin);
        assert_eq!(
            plan.keep,
            vec![
                ("2024-03-31T01:10:00Z", vec![Hourly, Newest]),
                ("2024-03-31T00:50:00Z", vec![Hourly]),
            ]
        );
        assert_eq!(plan.delete, vec!["2024-03-31T00:10:00Z"]);
    }

    #[test]
    fn ho_chi_minh_local_day_differs_from_utc_day() {
        // UTC+7, no DST: local midnight is 17:00 UTC.
        let items = items_at(&[
            "2024-04-30T16:00:00Z", // 30 Apr 23:00 local, UTC 30 Apr
            "2024-04-30T18:00:00Z", // 1 May 01:00 local, UTC 30 Apr
            "2024-05-01T16:30:00Z", // 1 May 23:30 local, UTC 1 May
            "2024-05-01T17:30:00Z", // 2 May 00:30 local, UTC 1 May
        ]);
        let policy = RetentionPolicy {
            keep_daily: 2,
            ..Default::default()
        };
        let plan = plan(&policy, &items, chrono_tz::Asia::Ho_Chi_Minh);
        assert_eq!(kept(&plan), vec!["2024-05-01T17:30:00Z", "2024-05-01T16:30:00Z"]);
        assert_eq!(plan.delete, vec!["2024-04-30T18:00:00Z", "2024-04-30T16:00:00Z"]);
        let plan = super::plan(&policy, &items, UTC);
        assert_eq!(kept(&plan), vec!["2024-05-01T17:30:00Z", "2024-04-30T18:00:00Z"]);
        assert_eq!(plan.delete, vec!["2024-05-01T16:30:00Z", "2024-04-30T16:00:00Z"]);
    }

    #[test]
    fn weekly_uses_iso_weeks_across_the_year_end() {
        // 2024-12-30 (Mon) .. 2025-01-05 (Sun) is ISO week 2025-W01.
        let items = items_at(&[
            "2024-12-29T12:00:00Z", // Sun, 2024-W52
            "2024-12-30T12:00:00Z", // Mon, 2025-W01
            "2025-01-05T12:00:00Z", // Sun, 2025-W01
        ]);
        let policy = RetentionPolicy {
            keep_weekly: 2,
            keep_yearly: 2,
            ..Default::default()
        };
        let plan = plan(&policy, &items, UTC);
        assert_eq!(
            plan.keep,
            vec![
                ("2025-01-05T12:00:00Z", vec![Weekly, Yearly, Newest]),
                ("2024-12-30T12:00:00Z", vec![Yearly]), // newest of 2024
                ("2024-12-29T12:00:00Z", vec![Weekly]),
            ]
        );
        assert!(plan.delete.is_empty());
    }

    #[test]
    fn empty_input_gives_empty_plan() {
        let policy = RetentionPolicy {
            keep_last: 3,
            ..Default::default()
        };
        let plan = plan::<u32>(&policy, &[], UTC);
        assert!(plan.keep.is_empty() && plan.delete.is_empty() && plan.blocked.is_empty());
        assert!(decide::<u32>(&policy, &[], UTC).is_empty());
    }

    #[test]
    fn all_zero_policy_keeps_everything() {
        let policy = RetentionPolicy::default();
        assert!(policy.keeps_everything());
        assert!(!RetentionPolicy {
            keep_yearly: 1,
            ..Default::default()
        }
        .keeps_everything());
        let mut items = items_at(&["2024-05-01T00:00:00Z", "2024-05-03T00:00:00Z", "2024-05-02T00:00:00Z"]);
        items[0].protected = true;
        let plan = plan(&policy, &items, UTC);
        assert_eq!(
            plan.keep,
            vec![
                ("2024-05-03T00:00:00Z", vec![Newest, NoPolicy]),
                ("2024-05-02T00:00:00Z", vec![NoPolicy]),
                ("2024-05-01T00:00:00Z", vec![NoPolicy]),
            ]
        );
        assert!(plan.delete.is_empty() && plan.blocked.is_empty());
    }

    #[test]
    fn reason_names() {
        assert_eq!(NoPolicy.to_string(), "no-policy");
        assert_eq!(Daily.as_str(), "daily");
    }
}
