//! When is an agent up, and when is a whole site unreachable.

/// An agent is up while its last report is younger than `missed` report
/// intervals. `now` and `last_report` are Unix seconds.
pub fn agent_is_up(last_report: Option<f64>, now: f64, interval_seconds: f64, missed: u32) -> bool {
    match last_report {
        None => false,
        Some(at) => now - at <= interval_seconds * f64::from(missed.max(1)),
    }
}

/// A site is reachable while at least one of its agents is up. A site with
/// no agents is reported reachable: there is nothing to lose contact with,
/// and alerting on an empty site would only be noise.
pub fn site_is_reachable(agents_up: usize, agents_total: usize) -> bool {
    agents_total == 0 || agents_up > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_goes_down_after_missed_intervals() {
        assert!(!agent_is_up(None, 1000.0, 15.0, 3));
        assert!(agent_is_up(Some(1000.0), 1000.0, 15.0, 3));
        assert!(agent_is_up(Some(1000.0), 1045.0, 15.0, 3));
        assert!(!agent_is_up(Some(1000.0), 1045.1, 15.0, 3));
        // A zero count never means "always down".
        assert!(agent_is_up(Some(1000.0), 1010.0, 15.0, 0));
    }

    #[test]
    fn site_down_only_when_every_agent_is_down() {
        assert!(site_is_reachable(1, 2));
        assert!(!site_is_reachable(0, 2));
        assert!(site_is_reachable(0, 0));
    }
}
