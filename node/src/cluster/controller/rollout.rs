//! Phased rollouts: a deployment's targets in waves, each wave running and healthy for a set
//! time before the next starts, halted when a wave reaches its failure threshold, paused,
//! resumed or aborted by hand, and telephony drained before it is replaced (a dependent leaves
//! its load balancer's pool, the load balancer applies that, the drain time passes, then the
//! order goes out; it returns to the pool once its software is healthy again).
//!
//! Pure: [`plan`] splits the targets into waves when the deployment is created, and
//! [`Rollout::step`] decides, from what each target's machine record says at `now`, what to do
//! next ([`Action`]). The core thread (`deploy::DeployBook`) observes, steps on every tick and
//! performs the actions; the rollout is persisted with its deployment record, so a restart
//! goes on where it stood.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;
use crate::limits::ROLLOUT_HEALTHY_FOR_DEFAULT_MS;

/// One wave's size as requested: a number of machines or a percentage of the targets, both
/// cumulative (`[1, "25%", "100%"]`: one machine, then up to a quarter, then the rest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaveSize {
    Count(usize),
    Percent(u8),
}

/// Why a wave's size was refused (the API answers 400 with it, after the field's name).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WaveSizeError {
    /// A number below 1 or not an integer (as written).
    #[error("{0} is not a machine count (1 or more)")]
    NotACount(String),
    /// A string that is not `1%` to `100%` (its first 16 characters).
    #[error("{0:?} is not a percentage (\"1%\" to \"100%\")")]
    NotAPercentage(String),
    /// Any other JSON value (as written).
    #[error("{0} is neither a machine count nor a percentage")]
    Neither(String),
}

/// Why an operator's control of a rollout cannot be done: the rollout is over.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the rollout is {state}{}; it can no longer {control}",
    reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
)]
pub struct ControlError {
    pub state: &'static str,
    pub reason: Option<String>,
    pub control: &'static str,
}

impl WaveSize {
    /// `3`, or `"25%"`.
    pub fn parse(v: &serde_json::Value) -> Result<WaveSize, WaveSizeError> {
        match v {
            serde_json::Value::Number(n) => match n.as_u64() {
                Some(c) if c >= 1 => Ok(WaveSize::Count(c as usize)),
                _ => Err(WaveSizeError::NotACount(n.to_string())),
            },
            serde_json::Value::String(s) => {
                let p = s
                    .strip_suffix('%')
                    .and_then(|p| p.trim().parse::<u8>().ok())
                    .filter(|p| (1..=100).contains(p))
                    .ok_or_else(|| WaveSizeError::NotAPercentage(s.chars().take(16).collect()))?;
                Ok(WaveSize::Percent(p))
            }
            other => Err(WaveSizeError::Neither(other.to_string())),
        }
    }

    /// How many of `total` targets are covered once this wave is done.
    fn covered(self, total: usize) -> usize {
        match self {
            WaveSize::Count(c) => c.min(total),
            WaveSize::Percent(p) => (total * p as usize).div_ceil(100),
        }
    }
}

/// How a deployment goes out, as the request asked for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RolloutSpec {
    /// Empty: one wave (unless `max_parallel`).
    pub waves: Vec<WaveSize>,
    pub max_parallel: Option<usize>,
    pub healthy_for_ms: Option<u64>,
    /// Halt when this many targets of one wave rolled back or failed (0: never halt).
    pub failure_threshold: Option<u32>,
    /// Drain dependents this long before replacing them. Phased rollouts drain by default
    /// (with no wait beyond their load balancer applying the pool).
    pub drain_ms: Option<u64>,
}

impl RolloutSpec {
    pub fn is_phased(&self) -> bool {
        !self.waves.is_empty() || self.max_parallel.is_some()
    }
}

/// What a target is, for planning: whether it is a load balancer coupled with a call router.
#[derive(Clone, Debug)]
pub struct PlanTarget {
    pub node: NodeId,
    pub name: String,
    /// A load balancer serving a call router.
    pub coupled_lb: bool,
}

impl PlanTarget {
    /// The machine `m` as a target.
    pub fn of(m: &crate::cluster::controller::core::MachineRecord) -> PlanTarget {
        PlanTarget {
            node: m.node_id,
            name: m.name.clone(),
            coupled_lb: m.is_load_balancer()
                && m.balancing.router.as_ref().is_some_and(Option::is_some),
        }
    }
}

/// Splits `targets` (in the deployment's order) into waves. Every target is in exactly one
/// wave, in order, no wave is empty. A load balancer serving a call router is never in the same
/// wave as every other such load balancer among the targets (its peers): when a wave would
/// hold all of them (two or more), the last is moved to the next wave, so some router always
/// keeps a load balancer that is not being replaced.
pub fn plan(targets: &[PlanTarget], spec: &RolloutSpec) -> Vec<Vec<NodeId>> {
    let total = targets.len();
    let mut ends: Vec<usize> = Vec::new();
    if let Some(n) = spec.max_parallel {
        let n = n.max(1);
        let mut e = 0;
        while e < total {
            e = (e + n).min(total);
            ends.push(e);
        }
    } else {
        for w in &spec.waves {
            let e = w
                .covered(total)
                .max(ends.last().map_or(1, |l| l + 1))
                .min(total);
            if ends.last() != Some(&e) {
                ends.push(e);
            }
        }
    }
    if ends.last() != Some(&total) {
        ends.push(total);
    }
    let mut waves: Vec<Vec<&PlanTarget>> = Vec::new();
    let mut start = 0;
    for e in ends {
        if e > start {
            waves.push(targets[start..e].iter().collect());
            start = e;
        }
    }
    let coupled = targets.iter().filter(|t| t.coupled_lb).count();
    if coupled >= 2 {
        let mut i = 0;
        while i < waves.len() {
            if waves[i].iter().filter(|t| t.coupled_lb).count() == coupled {
                let at = waves[i]
                    .iter()
                    .rposition(|t| t.coupled_lb)
                    .expect("counted");
                let moved = waves[i].remove(at);
                if i + 1 == waves.len() {
                    waves.push(Vec::new());
                }
                waves[i + 1].insert(0, moved);
                if waves[i].is_empty() {
                    waves.remove(i);
                    continue;
                }
            }
            i += 1;
        }
    }
    waves
        .into_iter()
        .map(|w| w.into_iter().map(|t| t.node).collect())
        .collect()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutState {
    /// Waves go out as they become due.
    #[default]
    Running,
    /// By hand: nothing new is sent (what was sent goes on); `resume` goes on.
    Paused,
    /// A wave reached its failure threshold (or a newer deployment took over): nothing more is
    /// sent. The reason says which.
    Halted,
    /// By hand: nothing more is sent.
    Aborted,
    /// Every wave ran and was healthy.
    Done,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Halted => "halted",
            RolloutState::Aborted => "aborted",
            RolloutState::Done => "done",
        }
    }

    /// Nothing will change any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RolloutState::Halted | RolloutState::Aborted | RolloutState::Done
        )
    }
}

/// A deployment's rollout, persisted after its record. A record stored before rollouts existed
/// decodes to the default: no waves, meaning every target was sent at creation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// The targets of each wave, fixed at creation.
    pub waves: Vec<Vec<NodeId>>,
    pub healthy_for_ms: u64,
    /// 0: never halt.
    pub failure_threshold: u32,
    /// `Some`: dependents are drained (out of their pool) this long before they are sent the
    /// order.
    pub drain_ms: Option<u64>,
    pub state: RolloutState,
    pub reason: Option<String>,
    /// The wave in progress (index into `waves`).
    pub wave: u32,
    /// When each wave started (one per started wave).
    pub wave_started_ms: Vec<u64>,
    /// When the current wave was first seen all running and healthy (reset when it is not).
    pub healthy_since_ms: Option<u64>,
    /// Targets out of their pool, waiting to be sent the order, and since when.
    pub draining: Vec<(NodeId, u64)>,
    /// Targets handed to the sealer (sent, or about to be).
    pub sent: Vec<NodeId>,
}

/// What a target's machine record says at `now`, as [`Rollout::step`] needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The deployment's status on it (`deploy::status_of` words, or `failed` when it could
    /// not be sent).
    pub status: &'static str,
    pub reason: Option<String>,
    /// A newer deployment replaced this one there.
    pub superseded_by: Option<u64>,
    /// Up, and its software reports running.
    pub healthy: bool,
    /// In a load balancer's pool now (so it must leave it before it is replaced).
    pub in_pool: bool,
    /// Out of its load balancer's pool and the load balancer applied that (or it is down).
    pub drained: bool,
}

impl Observed {
    pub fn is_final(&self) -> bool {
        matches!(self.status, "running" | "rolled_back" | "failed")
    }

    fn failed(&self) -> bool {
        self.superseded_by.is_none() && matches!(self.status, "rolled_back" | "failed")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Take it out of its load balancer's pool.
    Drain(NodeId),
    /// Seal the bundle to it and publish the order.
    Send(NodeId),
    /// It may return to its pool (once healthy: pool membership also needs it up and running).
    Undrain(NodeId),
}

/// What an operator may do to a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    Abort,
}

impl Control {
    pub fn parse(s: &str) -> Option<Control> {
        match s {
            "pause" => Some(Control::Pause),
            "resume" => Some(Control::Resume),
            "abort" => Some(Control::Abort),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Control::Pause => "pause",
            Control::Resume => "resume",
            Control::Abort => "abort",
        }
    }
}

impl Rollout {
    /// A new rollout of `waves` as `spec` asks.
    pub fn new(waves: Vec<Vec<NodeId>>, spec: &RolloutSpec, now_ms: u64) -> Rollout {
        let phased = spec.is_phased();
        Rollout {
            waves,
            healthy_for_ms: spec.healthy_for_ms.unwrap_or(if phased {
                ROLLOUT_HEALTHY_FOR_DEFAULT_MS
            } else {
                0
            }),
            failure_threshold: spec.failure_threshold.unwrap_or(if phased { 1 } else { 0 }),
            drain_ms: spec.drain_ms.or(phased.then_some(0)),
            state: RolloutState::Running,
            reason: None,
            wave: 0,
            wave_started_ms: vec![now_ms],
            healthy_since_ms: None,
            draining: Vec::new(),
            sent: Vec::new(),
        }
    }

    /// A record stored before rollouts existed: every target was sent at creation.
    pub fn is_legacy(&self) -> bool {
        self.waves.is_empty()
    }

    /// The wave (index) `node` is in.
    pub fn wave_of(&self, node: NodeId) -> Option<usize> {
        self.waves.iter().position(|w| w.contains(&node))
    }

    pub fn is_sent(&self, node: NodeId) -> bool {
        self.sent.contains(&node)
    }

    pub fn draining_since(&self, node: NodeId) -> Option<u64> {
        self.draining
            .iter()
            .find(|(n, _)| *n == node)
            .map(|(_, t)| *t)
    }

    /// An operator's `pause`, `resume` or `abort`: the actions to perform (targets drained and
    /// not sent go back to their pool on an abort), or why it cannot be done.
    pub fn control(&mut self, c: Control) -> Result<Vec<Action>, ControlError> {
        if self.state.is_final() {
            return Err(ControlError {
                state: self.state.as_str(),
                reason: self.reason.clone(),
                control: c.as_str(),
            });
        }
        match c {
            Control::Pause => self.state = RolloutState::Paused,
            Control::Resume => self.state = RolloutState::Running,
            Control::Abort => {
                self.state = RolloutState::Aborted;
                self.reason = Some("aborted by an operator".into());
                return Ok(self.stop());
            }
        }
        Ok(Vec::new())
    }

    /// Nothing more goes out: the drained targets that were not sent go back.
    fn stop(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.draining)
            .into_iter()
            .map(|(n, _)| Action::Undrain(n))
            .collect()
    }

    /// One step at `now`: what to do next, from what each target of the current wave looks
    /// like (`observe`, with the target's name for reasons). Changes the rollout; the caller
    /// persists it when the answer or the rollout changed.
    pub fn step(
        &mut self,
        now_ms: u64,
        mut observe: impl FnMut(NodeId) -> (String, Observed),
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.is_legacy() || self.state.is_final() {
            return actions;
        }
        // A target back from its order returns to its pool.
        let mut back = BTreeSet::new();
        for &(n, _) in &self.draining {
            if self.sent.contains(&n) && observe(n).1.is_final() {
                back.insert(n);
            }
        }
        self.draining.retain(|(n, _)| !back.contains(n));
        actions.extend(back.into_iter().map(Action::Undrain));

        let wave_no = self.wave as usize;
        let Some(wave) = self.waves.get(wave_no).cloned() else {
            self.state = RolloutState::Done;
            return actions;
        };
        let seen: Vec<(NodeId, String, Observed)> = wave
            .iter()
            .map(|&n| {
                let (name, o) = observe(n);
                (n, name, o)
            })
            .collect();
        if let Some((_, name, o)) = seen.iter().find(|(_, _, o)| o.superseded_by.is_some()) {
            self.state = RolloutState::Halted;
            self.reason = Some(format!(
                "superseded by deployment {} on {name}",
                o.superseded_by.unwrap_or_default()
            ));
            actions.extend(self.stop());
            return actions;
        }
        let failed: Vec<&(NodeId, String, Observed)> = seen
            .iter()
            .filter(|(n, _, o)| self.sent.contains(n) && o.failed())
            .collect();
        if self.failure_threshold > 0 && failed.len() >= self.failure_threshold as usize {
            let (_, name, o) = failed[0];
            self.state = RolloutState::Halted;
            self.reason = Some(format!(
                "wave {} of {}: {} of {} failed, the threshold is {} ({name}: {}{})",
                wave_no + 1,
                self.waves.len(),
                failed.len(),
                wave.len(),
                self.failure_threshold,
                o.status,
                o.reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ));
            actions.extend(self.stop());
            return actions;
        }
        if self.state == RolloutState::Paused {
            return actions;
        }
        for (n, _, o) in &seen {
            if self.sent.contains(n) {
                continue;
            }
            match (self.drain_ms, self.draining_since(*n)) {
                (Some(_), None) if o.in_pool => {
                    self.draining.push((*n, now_ms));
                    actions.push(Action::Drain(*n));
                }
                (Some(drain), Some(since)) => {
                    if o.drained && now_ms.saturating_sub(since) >= drain {
                        self.sent.push(*n);
                        actions.push(Action::Send(*n));
                    }
                }
                _ => {
                    self.sent.push(*n);
                    actions.push(Action::Send(*n));
                }
            }
        }
        let all_final = seen
            .iter()
            .all(|(n, _, o)| self.sent.contains(n) && o.is_final());
        // Without a hold, a wave whose every order finished is done; with one, its machines
        // must also be up and running (a rolled back one counts as finished: the threshold
        // decides about those).
        let healthy = all_final
            && (self.healthy_for_ms == 0 || seen.iter().all(|(_, _, o)| o.failed() || o.healthy));
        if !healthy {
            self.healthy_since_ms = None;
            return actions;
        }
        let since = *self.healthy_since_ms.get_or_insert(now_ms);
        if now_ms.saturating_sub(since) < self.healthy_for_ms {
            return actions;
        }
        self.healthy_since_ms = None;
        if wave_no + 1 >= self.waves.len() {
            self.state = RolloutState::Done;
            return actions;
        }
        self.wave += 1;
        self.wave_started_ms.push(now_ms);
        // The next wave starts at once.
        actions.extend(self.step(now_ms, observe));
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn targets(n: usize, coupled: &[usize]) -> Vec<PlanTarget> {
        (0..n)
            .map(|i| PlanTarget {
                node: NodeId(i as u128 + 1),
                name: format!("m-{i}"),
                coupled_lb: coupled.contains(&i),
            })
            .collect()
    }

    fn sizes(w: &[Vec<NodeId>]) -> Vec<usize> {
        w.iter().map(Vec::len).collect()
    }

    fn spec(waves: &[WaveSize]) -> RolloutSpec {
        RolloutSpec {
            waves: waves.to_vec(),
            ..RolloutSpec::default()
        }
    }

    /// Invariant: every target is in exactly one wave, in order, and no wave is empty.
    #[test]
    fn waves_are_cumulative_and_cover_every_target_once() {
        use WaveSize::*;
        let t = targets(10, &[]);
        assert_eq!(
            sizes(&plan(&t, &spec(&[Count(1), Percent(25), Percent(100)]))),
            [1, 2, 7]
        );
        assert_eq!(sizes(&plan(&t, &spec(&[]))), [10]);
        // A last wave below 100% leaves the rest for one more wave; repeated sizes collapse.
        assert_eq!(
            sizes(&plan(&t, &spec(&[Percent(10), Percent(10), Count(5)]))),
            [1, 1, 3, 5]
        );
        let mp = RolloutSpec {
            max_parallel: Some(4),
            ..RolloutSpec::default()
        };
        assert_eq!(sizes(&plan(&t, &mp)), [4, 4, 2]);
        assert_eq!(sizes(&plan(&targets(2, &[]), &spec(&[Count(5)]))), [2]);
        for s in [
            spec(&[Count(1), Percent(25), Percent(100)]),
            spec(&[Percent(50)]),
            mp,
        ] {
            let flat: Vec<NodeId> = plan(&t, &s).concat();
            assert_eq!(flat, t.iter().map(|t| t.node).collect::<Vec<_>>());
        }
    }

    /// Invariant: a call router's load balancer is never replaced in the same wave as all of
    /// its peers (the other coupled load balancers among the targets).
    #[test]
    fn coupled_load_balancers_never_all_go_in_one_wave() {
        let t = targets(6, &[1, 3, 4]);
        for s in [
            spec(&[]),
            spec(&[WaveSize::Percent(100)]),
            RolloutSpec {
                max_parallel: Some(6),
                ..RolloutSpec::default()
            },
            spec(&[WaveSize::Count(5)]),
        ] {
            let waves = plan(&t, &s);
            for w in &waves {
                let lbs = w.iter().filter(|n| [2u128, 4, 5].contains(&n.0)).count();
                assert!(lbs < 3, "{waves:?}");
                assert!(!w.is_empty());
            }
            assert_eq!(waves.concat().len(), 6);
        }
        // A single coupled load balancer has no peer: nothing to keep apart.
        assert_eq!(sizes(&plan(&targets(3, &[0]), &spec(&[]))), [3]);
    }

    #[derive(Default)]
    struct World {
        obs: BTreeMap<NodeId, Observed>,
    }

    impl World {
        fn set(&mut self, n: u128, status: &'static str, healthy: bool) {
            let o = self.obs.get_mut(&NodeId(n)).unwrap();
            o.status = status;
            o.healthy = healthy;
        }
        fn step(&self, r: &mut Rollout, now: u64) -> Vec<Action> {
            r.step(now, |n| (format!("m-{}", n.0), self.obs[&n].clone()))
        }
    }

    fn world(n: u128, in_pool: bool) -> World {
        let mut w = World::default();
        for i in 1..=n {
            w.obs.insert(
                NodeId(i),
                Observed {
                    status: "pending",
                    reason: None,
                    superseded_by: None,
                    healthy: false,
                    in_pool,
                    drained: !in_pool,
                },
            );
        }
        w
    }

    fn sends(a: &[Action]) -> Vec<u128> {
        a.iter()
            .filter_map(|a| match a {
                Action::Send(n) => Some(n.0),
                _ => None,
            })
            .collect()
    }

    /// Invariant: a wave starts only once the previous one ran healthy for `healthy_for`; a
    /// wave that stops being healthy restarts the wait; the last wave done ends the rollout.
    #[test]
    fn the_next_wave_waits_until_this_one_was_healthy_for_the_set_time() {
        let t = targets(4, &[]);
        let s = RolloutSpec {
            waves: vec![WaveSize::Count(1), WaveSize::Percent(100)],
            healthy_for_ms: Some(1000),
            drain_ms: None,
            ..RolloutSpec::default()
        };
        let mut r = Rollout::new(plan(&t, &s), &s, 0);
        r.drain_ms = None;
        let mut w = world(4, false);
        assert_eq!(sends(&w.step(&mut r, 0)), [1]);
        assert_eq!(sends(&w.step(&mut r, 10)), Vec::<u128>::new());
        w.set(1, "running", true);
        assert!(w.step(&mut r, 100).is_empty());
        w.set(1, "running", false);
        assert!(
            w.step(&mut r, 600).is_empty(),
            "unhealthy: the wait restarts"
        );
        w.set(1, "running", true);
        assert!(w.step(&mut r, 700).is_empty());
        assert!(w.step(&mut r, 1600).is_empty());
        assert_eq!(sends(&w.step(&mut r, 1700)), [2, 3, 4]);
        assert_eq!(r.wave, 1);
        for n in 2..=4 {
            w.set(n, "running", true);
        }
        w.step(&mut r, 1800);
        assert_eq!(r.state, RolloutState::Running);
        w.step(&mut r, 2800);
        assert_eq!(r.state, RolloutState::Done);
        assert_eq!(r.wave_started_ms, [0, 1700]);
    }

    /// Invariant: a wave that reaches its failure threshold halts the rollout with the reason,
    /// and nothing more is sent.
    #[test]
    fn a_failure_at_the_threshold_halts_with_the_reason() {
        let t = targets(3, &[]);
        let s = spec(&[WaveSize::Count(1), WaveSize::Percent(100)]);
        let mut r = Rollout::new(plan(&t, &s), &s, 0);
        let mut w = world(3, false);
        assert_eq!(sends(&w.step(&mut r, 0)), [1]);
        w.set(1, "rolled_back", false);
        w.obs.get_mut(&NodeId(1)).unwrap().reason = Some("health check failed".into());
        assert!(w.step(&mut r, 50).is_empty());
        assert_eq!(r.state, RolloutState::Halted);
        let reason = r.reason.clone().unwrap();
        assert!(
            reason.contains("wave 1 of 2")
                && reason.contains("m-1: rolled_back: health check failed"),
            "{reason}"
        );
        assert!(w.step(&mut r, 1_000_000).is_empty());
        assert_eq!(r.sent, [NodeId(1)]);
        assert!(r.control(Control::Resume).is_err());
    }

    /// Invariant: paused, nothing new is sent; resumed, it goes on; aborted, drained targets go
    /// back to their pool and nothing more is sent.
    #[test]
    fn pause_resume_and_abort() {
        let t = targets(4, &[]);
        let s = RolloutSpec {
            max_parallel: Some(2),
            healthy_for_ms: Some(0),
            ..RolloutSpec::default()
        };
        let mut r = Rollout::new(plan(&t, &s), &s, 0);
        r.drain_ms = None;
        let mut w = world(4, false);
        assert_eq!(sends(&w.step(&mut r, 0)), [1, 2]);
        r.control(Control::Pause).unwrap();
        w.set(1, "running", true);
        w.set(2, "running", true);
        assert!(w.step(&mut r, 10).is_empty());
        assert_eq!(r.wave, 0);
        r.control(Control::Resume).unwrap();
        assert_eq!(sends(&w.step(&mut r, 20)), [3, 4]);
        // Abort with draining targets (a rollout that drains).
        let mut r = Rollout::new(plan(&t, &s), &s, 0);
        let mut w = world(4, true);
        let a = w.step(&mut r, 0);
        assert_eq!(a, [Action::Drain(NodeId(1)), Action::Drain(NodeId(2))]);
        assert_eq!(
            r.control(Control::Abort).unwrap(),
            [Action::Undrain(NodeId(1)), Action::Undrain(NodeId(2))]
        );
        assert_eq!(r.state, RolloutState::Aborted);
        w.set(1, "running", true);
        assert!(w.step(&mut r, 10_000).is_empty());
    }

    /// Invariant: a dependent leaves its pool, the load balancer applies that and the drain
    /// time passes before it is sent the order; it returns once the order is done.
    #[test]
    fn a_dependent_is_drained_before_it_is_replaced_and_returns_after() {
        let t = targets(1, &[]);
        let s = RolloutSpec {
            max_parallel: Some(1),
            drain_ms: Some(500),
            healthy_for_ms: Some(0),
            ..RolloutSpec::default()
        };
        let mut r = Rollout::new(plan(&t, &s), &s, 0);
        let mut w = world(1, true);
        assert_eq!(w.step(&mut r, 0), [Action::Drain(NodeId(1))]);
        assert!(
            w.step(&mut r, 600).is_empty(),
            "the pool is not applied yet"
        );
        let o = w.obs.get_mut(&NodeId(1)).unwrap();
        o.in_pool = false;
        o.drained = true;
        assert!(
            w.step(&mut r, 400).is_empty(),
            "the drain time has not passed"
        );
        assert_eq!(w.step(&mut r, 700), [Action::Send(NodeId(1))]);
        w.set(1, "running", true);
        assert_eq!(w.step(&mut r, 800), [Action::Undrain(NodeId(1))]);
        assert_eq!(r.state, RolloutState::Done);
    }

    #[test]
    fn wave_sizes_parse_or_say_why_not() {
        use serde_json::json;
        assert_eq!(WaveSize::parse(&json!(3)), Ok(WaveSize::Count(3)));
        assert_eq!(WaveSize::parse(&json!("25%")), Ok(WaveSize::Percent(25)));
        for bad in [
            json!(0),
            json!(-1),
            json!("0%"),
            json!("101%"),
            json!("x"),
            json!(null),
        ] {
            assert!(WaveSize::parse(&bad).is_err(), "{bad}");
        }
    }
}
