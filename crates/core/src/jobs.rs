//! When a job runs: the pure state machine behind the scheduler.
//!
//! The scheduler keeps one [`JobTimer`] per job and feeds it the time
//! (`tick`), run results (`finished`) and operator actions; the timer
//! answers with [`Action`]s. No clock, no I/O: every case is a literal test.

use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::backoff::Backoff;
use crate::schedule::Schedule;

/// Why a run started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Schedule,
    /// The controller was down across a fire: run once on start.
    CatchUp,
    Manual,
    Retry,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::CatchUp => "catch_up",
            Trigger::Manual => "manual",
            Trigger::Retry => "retry",
        }
    }

    pub fn parse(text: &str) -> Option<Trigger> {
        [Trigger::Schedule, Trigger::CatchUp, Trigger::Manual, Trigger::Retry]
            .into_iter()
            .find(|t| t.as_str() == text)
    }
}

/// What a fire does when the previous run is still going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// Skip the fire (counted).
    Skip,
    /// Run once more right after the current run (at most one waits).
    Queue,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunPolicy {
    pub catch_up: bool,
    pub overlap: Overlap,
    /// A run still going after this long is stopped and recorded timed out.
    pub max_runtime: Duration,
    /// Retries after a failed or timed-out run.
    pub retries: u32,
    pub retry_backoff: Backoff,
    /// Random delay up to this long after each scheduled fire.
    pub jitter: Duration,
}

impl Default for RunPolicy {
    fn default() -> Self {
        RunPolicy {
            catch_up: true,
            overlap: Overlap::Skip,
            max_runtime: Duration::from_secs(6 * 3600),
            retries: 2,
            retry_backoff: Backoff {
                initial: Duration::from_secs(60),
                max: Duration::from_secs(1800),
                factor: 2.0,
                jitter: 0.2,
            },
            jitter: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    TimedOut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    Overlap,
    Paused,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Overlap => "overlap",
            SkipReason::Paused => "paused",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start a run at `at` (now, or later by the jitter). `attempt` is 0 for
    /// a first try.
    Start {
        trigger: Trigger,
        attempt: u32,
        at: DateTime<Utc>,
    },
    /// A fire that did not start a run.
    Skip { reason: SkipReason, fire: DateTime<Utc> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveRun {
    pub started: DateTime<Utc>,
    pub trigger: Trigger,
    pub attempt: u32,
}

/// The scheduling state of one job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobTimer {
    pub next_fire: Option<DateTime<Utc>>,
    /// The last fire acted upon (persisted, for catch-up after downtime).
    pub last_fire: Option<DateTime<Utc>>,
    pub paused: bool,
    pub running: Option<ActiveRun>,
    pub queued: Option<Trigger>,
    /// A retry waiting for its time: (when, attempt number).
    pub retry: Option<(DateTime<Utc>, u32)>,
}

fn after(at: DateTime<Utc>, delay: Duration) -> DateTime<Utc> {
    at + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero())
}

impl JobTimer {
    /// The timer of a job when the controller starts. `last_fire` is the
    /// last fire recorded before the restart (or when the job was first
    /// seen). If a fire was missed while down and the policy allows, one
    /// catch-up run starts now, however many fires were missed. `adopted`
    /// is a run a previous controller process handed to an agent and whose
    /// result is still to come: the catch-up waits for its end.
    pub fn start(
        schedule: Option<&Schedule>,
        tz: Tz,
        policy: &RunPolicy,
        last_fire: Option<DateTime<Utc>>,
        paused: bool,
        adopted: Option<ActiveRun>,
        now: DateTime<Utc>,
    ) -> (JobTimer, Option<Action>) {
        let mut timer = JobTimer {
            next_fire: schedule.and_then(|s| s.next_after(now, tz)),
            last_fire,
            paused,
            running: adopted,
            queued: None,
            retry: None,
        };
        let missed = match (schedule, last_fire) {
            (Some(s), Some(last)) => s.next_after(last, tz).filter(|fire| *fire <= now),
            _ => None,
        };
        let action = match missed {
            Some(fire) if policy.catch_up && !paused => {
                timer.last_fire = Some(fire);
                if timer.running.is_some() {
                    // The missed fire most likely came after the adopted
                    // run ended on its agent: run once when its result is in.
                    timer.queued = Some(Trigger::CatchUp);
                    None
                } else {
                    Some(timer.begin(Trigger::CatchUp, 0, now))
                }
            }
            _ => None,
        };
        (timer, action)
    }

    fn begin(&mut self, trigger: Trigger, attempt: u32, at: DateTime<Utc>) -> Action {
        self.running = Some(ActiveRun {
            started: at,
            trigger,
            attempt,
        });
        Action::Start { trigger, attempt, at }
    }

    /// Advances to `now`. `random` in `[0, 1)` draws the jitter and backoff.
    pub fn tick(
        &mut self,
        schedule: Option<&Schedule>,
        tz: Tz,
        policy: &RunPolicy,
        now: DateTime<Utc>,
        random: f64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some((at, attempt)) = self.retry {
            if at <= now && self.running.is_none() && !self.paused {
                self.retry = None;
                actions.push(self.begin(Trigger::Retry, attempt, now));
            }
        }
        let Some(fire) = self.next_fire.filter(|fire| *fire <= now) else {
            return actions;
        };
        self.last_fire = Some(fire);
        // However many fires passed (a clock jump, a stall), fire once.
        self.next_fire = schedule.and_then(|s| s.next_after(now, tz));
        if self.paused {
            actions.push(Action::Skip {
                reason: SkipReason::Paused,
                fire,
            });
        } else if self.running.is_some() {
            match policy.overlap {
                Overlap::Queue if self.queued.is_none() => self.queued = Some(Trigger::Schedule),
                _ => actions.push(Action::Skip {
                    reason: SkipReason::Overlap,
                    fire,
                }),
            }
        } else {
            // A new fire supersedes a retry still waiting.
            self.retry = None;
            let delay = policy.jitter.mul_f64(random.clamp(0.0, 1.0));
            actions.push(self.begin(Trigger::Schedule, 0, after(fire.max(now), delay)));
        }
        actions
    }

    /// An operator's "run now". Refused while a run is going.
    pub fn run_now(&mut self, now: DateTime<Utc>) -> Result<Action, SkipReason> {
        if self.running.is_some() {
            return Err(SkipReason::Overlap);
        }
        Ok(self.begin(Trigger::Manual, 0, now))
    }

    /// True once the running run has exceeded the policy's max runtime.
    pub fn timed_out(&self, policy: &RunPolicy, now: DateTime<Utc>) -> bool {
        self.running
            .is_some_and(|run| now > after(run.started, policy.max_runtime))
    }

    /// The running run ended. A failure is retried with backoff while the
    /// retry still comes before the next fire; a queued fire starts now.
    pub fn finished(
        &mut self,
        outcome: Outcome,
        policy: &RunPolicy,
        now: DateTime<Utc>,
        random: f64,
    ) -> Option<Action> {
        let run = self.running.take()?;
        self.retry = None;
        if outcome != Outcome::Succeeded && run.attempt < policy.retries {
            let at = after(now, policy.retry_backoff.delay(run.attempt, random));
            if self.next_fire.is_none_or(|next| at < next) {
                self.retry = Some((at, run.attempt + 1));
            }
        }
        if let Some(trigger) = self.queued.take() {
            return Some(self.begin(trigger, 0, now));
        }
        None
    }

    /// At controller start: the job's last run, at `attempt`, ended without
    /// success at `ended`, and the process that would have retried it
    /// stopped. Its retry is due when it would have been (now, if that has
    /// passed), under the same rules as in `finished`.
    pub fn resume_retry(&mut self, attempt: u32, ended: DateTime<Utc>, policy: &RunPolicy, random: f64) {
        if self.running.is_some() || self.retry.is_some() || attempt >= policy.retries {
            return;
        }
        let at = after(ended, policy.retry_backoff.delay(attempt, random));
        if self.next_fire.is_none_or(|next| at < next) {
            self.retry = Some((at, attempt + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("2026-11-27T{text}Z"))
            .expect("time")
            .with_timezone(&Utc)
    }

    fn hourly() -> Schedule {
        Schedule::parse("0 * * * *").expect("schedule")
    }

    fn policy() -> RunPolicy {
        RunPolicy {
            retry_backoff: Backoff {
                initial: Duration::from_secs(60),
                max: Duration::from_secs(600),
                factor: 2.0,
                jitter: 0.0,
            },
            ..RunPolicy::default()
        }
    }

    const UTC: Tz = chrono_tz::UTC;

    #[test]
    fn fires_on_schedule_once_per_fire() {
        let s = hourly();
        let (mut timer, action) = JobTimer::start(
            Some(&s),
            UTC,
            &policy(),
            Some(t("09:30:00")),
            false,
            None,
            t("09:30:00"),
        );
        assert_eq!(action, None);
        assert_eq!(timer.next_fire, Some(t("10:00:00")));
        assert!(timer.tick(Some(&s), UTC, &policy(), t("09:59:59"), 0.5).is_empty());
        let actions = timer.tick(Some(&s), UTC, &policy(), t("10:00:00"), 0.5);
        assert_eq!(
            actions,
            [Action::Start {
                trigger: Trigger::Schedule,
                attempt: 0,
                at: t("10:00:00")
            }]
        );
        assert_eq!(timer.next_fire, Some(t("11:00:00")));
        assert!(timer.tick(Some(&s), UTC, &policy(), t("10:00:01"), 0.5).is_empty());
    }

    #[test]
    fn catch_up_runs_once_after_downtime_across_many_fires() {
        let s = hourly();
        // Last fire at 03:00, controller back at 09:30: six fires missed.
        let (timer, action) = JobTimer::start(
            Some(&s),
            UTC,
            &policy(),
            Some(t("03:00:00")),
            false,
            None,
            t("09:30:00"),
        );
        assert_eq!(
            action,
            Some(Action::Start {
                trigger: Trigger::CatchUp,
                attempt: 0,
                at: t("09:30:00")
            })
        );
        assert_eq!(timer.next_fire, Some(t("10:00:00")));
        // No catch-up when the policy says so, when paused, or when nothing was missed.
        let no = RunPolicy {
            catch_up: false,
            ..policy()
        };
        assert_eq!(
            JobTimer::start(Some(&s), UTC, &no, Some(t("03:00:00")), false, None, t("09:30:00")).1,
            None
        );
        assert_eq!(
            JobTimer::start(Some(&s), UTC, &policy(), Some(t("03:00:00")), true, None, t("09:30:00")).1,
            None
        );
        assert_eq!(
            JobTimer::start(
                Some(&s),
                UTC,
                &policy(),
                Some(t("09:00:00")),
                false,
                None,
                t("09:30:00")
            )
            .1,
            None
        );
    }

    #[test]
    fn a_run_adopted_after_a_restart_delays_the_catch_up_until_it_ends() {
        let s = hourly();
        let adopted = ActiveRun {
            started: t("03:00:00"),
            trigger: Trigger::Schedule,
            attempt: 0,
        };
        let (mut timer, action) = JobTimer::start(
            Some(&s),
            UTC,
            &policy(),
            Some(t("03:00:00")),
            false,
            Some(adopted),
            t("09:30:00"),
        );
        assert_eq!(action, None, "not while the adopted run may still be going");
        assert_eq!(timer.run_now(t("09:31:00")), Err(SkipReason::Overlap));
        assert_eq!(
            timer.finished(Outcome::Succeeded, &policy(), t("09:32:00"), 0.0),
            Some(Action::Start {
                trigger: Trigger::CatchUp,
                attempt: 0,
                at: t("09:32:00")
            })
        );
    }

    #[test]
    fn a_fire_during_a_run_is_skipped_or_queued() {
        let s = hourly();
        let (mut timer, _) = JobTimer::start(
            Some(&s),
            UTC,
            &policy(),
            Some(t("09:30:00")),
            false,
            None,
            t("09:30:00"),
        );
        timer.tick(Some(&s), UTC, &policy(), t("10:00:00"), 0.0);
        let actions = timer.tick(Some(&s), UTC, &policy(), t("11:00:00"), 0.0);
        assert_eq!(
            actions,
            [Action::Skip {
                reason: SkipReason::Overlap,
                fire: t("11:00:00")
            }]
        );
        assert_eq!(timer.finished(Outcome::Succeeded, &policy(), t("11:10:00"), 0.0), None);

        let queue = RunPolicy {
            overlap: Overlap::Queue,
            ..policy()
        };
        let (mut timer, _) = JobTimer::start(Some(&s), UTC, &queue, Some(t("09:30:00")), false, None, t("09:30:00"));
        timer.tick(Some(&s), UTC, &queue, t("10:00:00"), 0.0);
        assert!(timer.tick(Some(&s), UTC, &queue, t("11:00:00"), 0.0).is_empty());
        // Only one waits: a second fire during the same run is skipped.
        assert_eq!(timer.tick(Some(&s), UTC, &queue, t("12:00:00"), 0.0).len(), 1);
        assert_eq!(
            timer.finished(Outcome::Succeeded, &queue, t("12:10:00"), 0.0),
            Some(Action::Start {
                trigger: Trigger::Schedule,
                attempt: 0,
                at: t("12:10:00")
            })
        );
    }

    #[test]
    fn failures_retry_with_backoff_within_the_window() {
        let s = hourly();
        let (mut timer, _) = JobTimer::start(
            Some(&s),
            UTC,
            &policy(),
            Some(t("09:30:00")),
            false,
            None,
            t("09:30:00"),
        );
        timer.tick(Some(&s), UTC, &policy(), t("10:00:00"), 0.0);
        timer.finished(Outcome::Failed, &policy(), t("10:05:00"), 0.0);
        assert_eq!(timer.retry, Some((t("10:06:00"), 1)));
        assert!(timer.tick(Some(&s), UTC, &policy(), t("10:05:59"), 0.0).is_empty());
        let actions = timer.tick(Some(&s), UTC, &policy(), t("10:06:00"), 0.0);
        assert_eq!(
            actions,
            [Action::Start {
                trigger: Trigger::Retry,
                attempt: 1,
                at: t("10:06:00")
            }]
        );
        // Second failure: twice the delay.
        timer.finished(Outcome::TimedOut, &policy(), t("10:10:00"), 0.0);
        assert_eq!(timer.retry, Some((t("10:12:00"), 2)));
        timer.tick(Some(&s), UTC, &policy(), t("10:12:00"), 0.0);
        // Retries used up (2): no more.
        timer.finished(Outcome::Failed, &policy(), t("10:20:00"), 0.0);
        assert_eq!(timer.retry, None);
        // A retry that would land after the next fire is not scheduled.
        timer.tick(Some(&s), UTC, &policy(), t("11:00:00"), 0.0);
        timer.finished(Outcome::Failed, &policy(), t("11:59:30"), 0.0);
        assert_eq!(timer.retry, None);
    }

    #[test]
    fn a_retry_pending_when_the_controller_stopped_is_resumed_at_start() {
        let s = hourly();
        let start = |now| JobTimer::start(Some(&s), UTC, &policy(), Some(t("10:00:00")), false, None, now).0;
        // Failed at 10:05 (attempt 0): its retry was due at 10:06.
        let mut timer = start(t("10:05:30"));
        timer.resume_retry(0, t("10:05:00"), &policy(), 0.0);
        assert_eq!(timer.retry, Some((t("10:06:00"), 1)));
        assert_eq!(
            timer.tick(Some(&s), UTC, &policy(), t("10:06:00"), 0.0),
            [Action::Start {
                trigger: Trigger::Retry,
                attempt: 1,
                at: t("10:06:00")
            }]
        );
        // Down past the due time: the retry starts at once.
        let mut timer = start(t("10:30:00"));
        timer.resume_retry(1, t("10:05:00"), &policy(), 0.0);
        assert_eq!(timer.retry, Some((t("10:07:00"), 2)));
        assert!(matches!(
            timer.tick(Some(&s), UTC, &policy(), t("10:30:00"), 0.0)[..],
            [Action::Start {
                trigger: Trigger::Retry,
                attempt: 2,
                ..
            }]
        ));
        // Retries used up, or the retry would come after the next fire: none.
        let mut timer = start(t("10:30:00"));
        timer.resume_retry(2, t("10:05:00"), &policy(), 0.0);
        assert_eq!(timer.retry, None);
        let mut timer = start(t("10:59:50"));
        timer.resume_retry(0, t("10:59:30"), &policy(), 0.0);
        assert_eq!(timer.retry, None);
    }

    #[test]
    fn paused_jobs_skip_their_fires_and_resume() {
        let s = hourly();
        let (mut timer, _) = JobTimer::start(Some(&s), UTC, &policy(), Some(t("09:30:00")), true, None, t("09:30:00"));
        assert_eq!(
            timer.tick(Some(&s), UTC, &policy(), t("10:00:00"), 0.0),
            [Action::Skip {
                reason: SkipReason::Paused,
                fire: t("10:00:00")
            }]
        );
        timer.paused = false;
        assert!(matches!(
            timer.tick(Some(&s), UTC, &policy(), t("11:00:00"), 0.0)[..],
            [Action::Start { .. }]
        ));
    }

    #[test]
    fn run_now_never_overlaps() {
        let (mut timer, _) = JobTimer::start(None, UTC, &policy(), None, false, None, t("09:00:00"));
        assert_eq!(timer.next_fire, None);
        assert!(timer.run_now(t("09:00:00")).is_ok());
        assert_eq!(timer.run_now(t("09:00:01")), Err(SkipReason::Overlap));
    }

    #[test]
    fn max_runtime() {
        let p = RunPolicy {
            max_runtime: Duration::from_secs(600),
            ..policy()
        };
        let (mut timer, _) = JobTimer::start(None, UTC, &p, None, false, None, t("09:00:00"));
        timer.run_now(t("09:00:00")).expect("start");
        assert!(!timer.timed_out(&p, t("09:10:00")));
        assert!(timer.timed_out(&p, t("09:10:01")));
    }

    #[test]
    fn jitter_delays_the_start_within_its_bound() {
        let s = hourly();
        let p = RunPolicy {
            jitter: Duration::from_secs(120),
            ..policy()
        };
        let (mut timer, _) = JobTimer::start(Some(&s), UTC, &p, Some(t("09:30:00")), false, None, t("09:30:00"));
        let actions = timer.tick(Some(&s), UTC, &p, t("10:00:00"), 0.5);
        assert_eq!(
            actions,
            [Action::Start {
                trigger: Trigger::Schedule,
                attempt: 0,
                at: t("10:01:00")
            }]
        );
    }
}
