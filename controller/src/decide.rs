//! Standalone scaling decisions, as a pure function of what is known now.
//!
//! - A wake at zero goes to `max(1, min)` at once.
//! - Out: `ceil(metric / target)`, within `[min, max]`, at once.
//! - To `min` (zero by default): once `scaledownPeriod` has passed with no request at all (by
//!   the interceptors' own account of their last request), and never while requests are in
//!   flight or held, or while a backend's keep-awake deadline is ahead (the caller counts that
//!   time as busy, so the period runs from the deadline). Nothing else delays it: the stabilization window and a rate metric's
//!   window describe traffic that has ended, so they shape scale-in between non-zero counts
//!   only. The rule a user can predict: `scaledownPeriod` after the last request, plus at most
//!   one sample interval.
//! - In, above zero: to the largest replica count wanted during the stabilization window, so a
//!   dip between two samples does not flap the workload.

use std::time::Duration;

/// Everything a decision depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleInput {
    /// Replicas the workload asks for now.
    pub current: i32,
    /// Fewest replicas.
    pub min: i32,
    /// Most replicas.
    pub max: i32,
    /// The metric value (concurrency or request rate) over all interceptors.
    pub value: f64,
    /// Its target per replica.
    pub target: f64,
    /// Requests in flight now, held ones included.
    pub in_flight: f64,
    /// Time since the last request started or ended on any interceptor. The caller counts
    /// from its own start when no interceptor has said, so an unknown is never idle.
    pub idle_for: Duration,
    /// Idle time before scaling in to `min`.
    pub scaledown_period: Duration,
    /// Whether the initial cooldown after creation is still running (no scale-in yet).
    pub in_initial_cooldown: bool,
    /// The largest replica count this function wanted during the stabilization window.
    pub recent_max: i32,
}

/// What to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleDecision {
    /// Leave the replicas as they are.
    Keep,
    /// Set the replicas.
    ScaleTo(i32, Reason),
}

/// Why replicas change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Requests arrived for a workload at zero.
    Wake,
    /// The metric needs more replicas.
    Load,
    /// The metric needs fewer replicas (above the floor).
    LessLoad,
    /// No requests for the scale-down period.
    Idle,
    /// Outside `[min, max]`.
    Bounds,
}

impl Reason {
    /// A bounded label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wake => "wake",
            Self::Load => "load",
            Self::LessLoad => "less_load",
            Self::Idle => "idle",
            Self::Bounds => "bounds",
        }
    }
}

/// The replicas wanted for the load alone, before stabilization and idleness.
pub fn wanted(input: &ScaleInput) -> i32 {
    let for_load = if input.target > 0.0 {
        (input.value / input.target).ceil()
    } else {
        0.0
    };
    let mut wanted =
        (for_load.min(f64::from(i32::MAX)) as i32).clamp(input.min, input.max.max(input.min));
    if input.in_flight > 0.0 {
        wanted = wanted.max(1);
    }
    wanted
}

/// Decides, for a workload scaled by Wakegate alone.
pub fn decide(input: &ScaleInput) -> ScaleDecision {
    let wanted = wanted(input);
    let floor = input.min.max(0);
    if input.current < floor || input.current > input.max {
        return ScaleDecision::ScaleTo(input.current.clamp(floor, input.max), Reason::Bounds);
    }
    let idle = input.in_flight <= 0.0 && input.idle_for >= input.scaledown_period;
    if idle {
        // Idle outranks the metric: whatever a window still shows is from before the last
        // request.
        return if input.current > floor && !input.in_initial_cooldown {
            ScaleDecision::ScaleTo(floor, Reason::Idle)
        } else {
            ScaleDecision::Keep
        };
    }
    if wanted > input.current {
        let reason = if input.current == 0 {
            Reason::Wake
        } else {
            Reason::Load
        };
        return ScaleDecision::ScaleTo(wanted.max(1), reason);
    }
    if wanted >= input.current || input.in_initial_cooldown {
        return ScaleDecision::Keep;
    }
    // Above the floor: follow the load down, but not below what was wanted recently, and not
    // below one replica while traffic is recent.
    let target = wanted.max(input.recent_max.min(input.current)).max(1);
    if target >= input.current {
        return ScaleDecision::Keep;
    }
    ScaleDecision::ScaleTo(target, Reason::LessLoad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> ScaleInput {
        ScaleInput {
            current: 0,
            min: 0,
            max: 10,
            value: 0.0,
            target: 100.0,
            in_flight: 0.0,
            idle_for: Duration::ZERO,
            scaledown_period: Duration::from_secs(300),
            in_initial_cooldown: false,
            recent_max: 0,
        }
    }

    #[test]
    fn held_requests_wake_a_workload_at_zero_to_at_least_min() {
        let i = ScaleInput {
            in_flight: 1.0,
            value: 1.0,
            idle_for: Duration::ZERO,
            ..input()
        };
        assert_eq!(decide(&i), ScaleDecision::ScaleTo(1, Reason::Wake));
        let i = ScaleInput {
            min: 0,
            max: 10,
            in_flight: 250.0,
            value: 250.0,
            ..i
        };
        assert_eq!(decide(&i), ScaleDecision::ScaleTo(3, Reason::Wake));
    }

    #[test]
    fn scales_out_to_ceil_of_metric_over_target_within_bounds() {
        let i = ScaleInput {
            current: 1,
            value: 401.0,
            in_flight: 401.0,
            idle_for: Duration::ZERO,
            ..input()
        };
        assert_eq!(decide(&i), ScaleDecision::ScaleTo(5, Reason::Load));
        let i = ScaleInput { value: 5000.0, ..i };
        assert_eq!(decide(&i), ScaleDecision::ScaleTo(10, Reason::Load));
    }

    #[test]
    fn stays_up_until_the_scaledown_period_has_passed_with_no_requests() {
        let recent = ScaleInput {
            current: 1,
            idle_for: Duration::from_secs(299),
            recent_max: 1,
            ..input()
        };
        assert_eq!(decide(&recent), ScaleDecision::Keep);
        let idle = ScaleInput {
            idle_for: Duration::from_secs(300),
            recent_max: 0,
            ..recent.clone()
        };
        assert_eq!(decide(&idle), ScaleDecision::ScaleTo(0, Reason::Idle));
        let held = ScaleInput {
            in_flight: 1.0,
            value: 1.0,
            ..idle.clone()
        };
        assert_eq!(
            decide(&held),
            ScaleDecision::Keep,
            "never below what held requests need"
        );
        let min_two = ScaleInput {
            current: 3,
            min: 2,
            ..idle
        };
        assert_eq!(decide(&min_two), ScaleDecision::ScaleTo(2, Reason::Idle));
    }

    #[test]
    fn scale_in_above_zero_is_stabilized() {
        let i = ScaleInput {
            current: 5,
            value: 100.0,
            in_flight: 100.0,
            idle_for: Duration::ZERO,
            recent_max: 5,
            ..input()
        };
        assert_eq!(decide(&i), ScaleDecision::Keep, "wanted 5 recently");
        let i = ScaleInput { recent_max: 2, ..i };
        assert_eq!(decide(&i), ScaleDecision::ScaleTo(2, Reason::LessLoad));
        let cooling = ScaleInput {
            in_initial_cooldown: true,
            ..i
        };
        assert_eq!(decide(&cooling), ScaleDecision::Keep);
    }

    #[test]
    fn out_of_bounds_is_corrected() {
        let i = ScaleInput {
            current: 0,
            min: 2,
            ..input()
        };
        assert_eq!(decide(&i), ScaleDecision::ScaleTo(2, Reason::Bounds));
        let i = ScaleInput {
            current: 20,
            idle_for: Duration::ZERO,
            ..input()
        };
        assert_eq!(decide(&i), ScaleDecision::ScaleTo(10, Reason::Bounds));
    }

    #[test]
    fn going_to_zero_waits_for_nothing_but_the_scaledown_period() {
        // A concurrency route whose stabilization window still remembers one replica.
        let idle = ScaleInput {
            current: 1,
            idle_for: Duration::from_secs(15),
            scaledown_period: Duration::from_secs(15),
            recent_max: 1,
            ..input()
        };
        assert_eq!(decide(&idle), ScaleDecision::ScaleTo(0, Reason::Idle));
        // A request-rate route whose 1 m window still shows the last burst (3 rps over a
        // target of 1 would want 3 replicas), but no request for the period: idle wins.
        let rate = ScaleInput {
            value: 3.0,
            target: 1.0,
            recent_max: 3,
            ..idle.clone()
        };
        assert_eq!(decide(&rate), ScaleDecision::ScaleTo(0, Reason::Idle));
        // One millisecond short of the period: kept up, whatever else says.
        let early = ScaleInput {
            idle_for: Duration::from_millis(14_999),
            ..rate
        };
        assert_ne!(decide(&early), ScaleDecision::ScaleTo(0, Reason::Idle));
        let cooling = ScaleInput {
            in_initial_cooldown: true,
            ..idle
        };
        assert_eq!(decide(&cooling), ScaleDecision::Keep);
    }
}
