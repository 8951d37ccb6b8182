//! Pacing: every call waits for a slot in the API token's budget, so LeadRelay never draws a 429
//! from Pipedrive rather than recovering from one.
//!
//! Two rolling windows apply: the configured budget (`LEADRELAY_PIPEDRIVE_RATE_LIMIT`, the seed's
//! 100 calls per 60 s by default) to every call, and Pipedrive's search limit (10 per 2 s) to
//! search calls as well.
//!
//! Pipedrive counts a call when it arrives, which is somewhere between the moment we send it and
//! the moment its answer is back; how long that takes varies. So a call holds its place in the
//! window from the moment it is admitted until `per` after its answer: a new call is admitted
//! only while fewer than `limit` calls are in flight or answered within the last `per`. Then no
//! `per`-long window at Pipedrive can see more than `limit` arrivals, whatever the network and
//! scheduling delays (if `limit + 1` arrived inside one, the last one admitted was admitted less
//! than `per` after the others' answers, which the rule forbids). It costs one call's latency
//! per window. Callers are admitted in arrival order.
//!
//! Pipedrive's own signals tighten the pace: a burst window reported spent
//! (`x-ratelimit-remaining: 0`) or a 429 holds every call until the reset, and a spent daily
//! budget (`x-daily-ratelimit-token-remaining: 0`) fails calls at once, since it only resets at the
//! server's midnight.
//!
//! A call never waits longer than `max_wait` (one budget window, or less when the caller's
//! deadline is nearer): when its estimated slot is further away it is refused at once with the
//! delay, which the RPC reports as RESOURCE_EXHAUSTED with a retry hint.

use std::{sync::Mutex, time::Duration};

use leadrelay_runtime::config::RateLimit;
use reqwest::header::HeaderMap;
use tokio::{sync::Notify, time::Instant};

use crate::client::PipedriveError;

/// Pipedrive's limit for search endpoints on every plan.
pub const SEARCH_LIMIT: RateLimit = RateLimit {
    calls: 10,
    per: Duration::from_secs(2),
};

/// How long a spent daily budget is assumed to stay spent before a call probes it again.
const DAILY_RECHECK: Duration = Duration::from_secs(600);

/// Which limits a call counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// Every other endpoint.
    Regular,
    /// `…/search` endpoints: the budget and the search limit.
    Search,
}

/// One rolling window: at most `limit` calls in any `per`.
#[derive(Clone, Debug)]
struct Window {
    limit: usize,
    per: Duration,
    /// Calls holding a place: `None` while in flight, else when their answer came.
    calls: Vec<(u64, Option<Instant>)>,
}

/// When a new call may be admitted to a window.
enum Slot {
    Now,
    At(Instant),
    /// Every place is held by a call in flight: wait for an answer.
    AfterAnAnswer,
}

impl Window {
    fn new(limit: RateLimit) -> Self {
        Self {
            limit: usize::try_from(limit.calls).unwrap_or(usize::MAX).max(1),
            per: limit.per,
            calls: Vec::new(),
        }
    }

    fn slot(&mut self, now: Instant) -> Slot {
        let per = self.per;
        self.calls
            .retain(|(_, answered)| answered.is_none_or(|at| at + per > now));
        if self.calls.len() < self.limit {
            return Slot::Now;
        }
        // The places free up as answered calls age out, earliest first.
        let mut answered: Vec<Instant> = self.calls.iter().filter_map(|(_, at)| *at).collect();
        answered.sort_unstable();
        let must_free = self.calls.len() + 1 - self.limit;
        answered
            .get(must_free - 1)
            .map_or(Slot::AfterAnAnswer, |at| Slot::At(*at + per))
    }

    fn admit(&mut self, call: u64) {
        self.calls.push((call, None));
    }

    fn answered(&mut self, call: u64, at: Instant) {
        if let Some(entry) = self.calls.iter_mut().find(|(id, _)| *id == call) {
            entry.1 = Some(at);
        }
    }
}

#[derive(Clone, Debug)]
struct State {
    budget: Window,
    search: Window,
    /// No call starts before this (a spent burst window or a 429).
    held_until: Option<Instant>,
    /// The daily budget was reported spent; calls fail until this.
    daily_spent_until: Option<Instant>,
    /// Callers waiting for their turn.
    queued: usize,
    next_call: u64,
}

impl State {
    fn hold(&mut self, until: Instant) {
        self.held_until = Some(self.held_until.map_or(until, |held| held.max(until)));
    }

    fn daily_spent(&mut self, now: Instant) -> Result<(), PipedriveError> {
        match self.daily_spent_until {
            Some(until) if until > now => Err(PipedriveError::RateLimited {
                retry_after: until - now,
                daily: true,
            }),
            Some(_) => {
                self.daily_spent_until = None;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// When a call of `kind` may be admitted.
    fn slot(&mut self, kind: CallKind, now: Instant) -> Slot {
        let mut slots = vec![self.budget.slot(now)];
        if kind == CallKind::Search {
            slots.push(self.search.slot(now));
        }
        if let Some(held) = self.held_until.filter(|held| *held > now) {
            slots.push(Slot::At(held));
        }
        slots
            .into_iter()
            .fold(Slot::Now, |later, slot| match (later, slot) {
                (Slot::AfterAnAnswer, _) | (_, Slot::AfterAnAnswer) => Slot::AfterAnAnswer,
                (Slot::Now, other) | (other, Slot::Now) => other,
                (Slot::At(a), Slot::At(b)) => Slot::At(a.max(b)),
            })
    }

    fn admit(&mut self, kind: CallKind) -> u64 {
        let call = self.next_call;
        self.next_call += 1;
        self.budget.admit(call);
        if kind == CallKind::Search {
            self.search.admit(call);
        }
        call
    }

    fn answered(&mut self, call: u64, at: Instant) {
        self.budget.answered(call, at);
        self.search.answered(call, at);
    }
}

/// The pace of one API token.
#[derive(Debug)]
pub struct Pacer {
    state: Mutex<State>,
    /// Admission in arrival order (tokio's mutex is fair).
    turn: tokio::sync::Mutex<()>,
    answered: Notify,
    max_wait: Duration,
}

/// An admitted call's place in the windows. Dropping it marks the call answered (or abandoned),
/// which starts the `per` after which its place frees up.
#[derive(Debug)]
pub struct Permit<'p> {
    pacer: &'p Pacer,
    call: u64,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.pacer.lock().answered(self.call, Instant::now());
        self.pacer.answered.notify_waiters();
    }
}

/// Counts a caller as queued until it is admitted or gives up.
struct Queued<'p>(&'p Pacer);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.queued = state.queued.saturating_sub(1);
    }
}

impl Pacer {
    /// A pacer for `budget`, with Pipedrive's search limit on top; calls wait at most one window.
    pub fn new(budget: RateLimit) -> Self {
        Self::with_search_limit(budget, SEARCH_LIMIT)
    }

    /// A pacer for `budget` and `search` (a benchmark scales both windows alike).
    pub fn with_search_limit(budget: RateLimit, search: RateLimit) -> Self {
        Self {
            max_wait: budget.per,
            state: Mutex::new(State {
                budget: Window::new(budget),
                search: Window::new(search),
                held_until: None,
                daily_spent_until: None,
                queued: 0,
                next_call: 0,
            }),
            turn: tokio::sync::Mutex::new(()),
            answered: Notify::new(),
        }
    }

    /// Waits for a place for one call of `kind`, or refuses at once when it would be more than
    /// `max_wait` (or `deadline`, when nearer) away. Keep the permit until the answer is in.
    pub async fn admit(
        &self,
        kind: CallKind,
        deadline: Option<Duration>,
    ) -> Result<Permit<'_>, PipedriveError> {
        let max_wait = deadline.map_or(self.max_wait, |deadline| deadline.min(self.max_wait));
        let queued = {
            let now = Instant::now();
            let mut state = self.lock();
            state.daily_spent(now)?;
            let wait = estimate(&state, kind, now).saturating_duration_since(now);
            if wait > max_wait {
                return Err(PipedriveError::RateLimited {
                    retry_after: wait,
                    daily: false,
                });
            }
            state.queued += 1;
            Queued(self)
        };
        let asked = Instant::now();
        let _turn = self.turn.lock().await;
        drop(queued);
        loop {
            // Registered before the check, so an answer in between is not missed.
            let answer = self.answered.notified();
            let slot = {
                let now = Instant::now();
                let mut state = self.lock();
                state.daily_spent(now)?;
                match state.slot(kind, now) {
                    Slot::Now => {
                        let call = state.admit(kind);
                        let waited = now.saturating_duration_since(asked);
                        // Waits for the turn alone (calls in line, no limit reached) do not count.
                        if waited >= Duration::from_millis(1) {
                            leadrelay_runtime::metrics::metrics()
                                .rate_limit_wait("pipedrive", waited);
                        }
                        return Ok(Permit { pacer: self, call });
                    }
                    slot => slot,
                }
            };
            // Checked again on waking: a hold may have been added meanwhile.
            match slot {
                Slot::At(at) => tokio::time::sleep_until(at).await,
                _ => answer.await,
            }
        }
    }

    /// Reads Pipedrive's rate headers from any answer: a spent burst window holds calls until
    /// its reset, a spent daily budget fails calls for a while.
    pub fn observe(&self, headers: &HeaderMap) {
        let number = |name: &str| crate::client::header_number(headers, name);
        let now = Instant::now();
        let mut state = self.lock();
        if number("x-ratelimit-remaining") == Some(0.0) {
            let reset = number("x-ratelimit-reset").unwrap_or(2.0);
            state.hold(now + Duration::from_secs_f64(reset.min(3600.0)));
        }
        if ["x-daily-ratelimit-token-remaining", "x-daily-requests-left"]
            .iter()
            .any(|name| number(name) == Some(0.0))
        {
            state.daily_spent_until = Some(now + DAILY_RECHECK);
        }
    }

    /// Holds every call after a 429 for as long as Pipedrive asked.
    pub fn rate_limited(&self, retry_after: Duration, daily: bool) {
        let now = Instant::now();
        let mut state = self.lock();
        if daily {
            state.daily_spent_until = Some(now + retry_after.max(DAILY_RECHECK));
        } else {
            state.hold(now + retry_after);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent at every await-free step, so a poisoned lock is usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// When a caller arriving now would be admitted, behind everyone queued, assuming every call
/// in flight is answered now and every queued one is answered as soon as it is admitted.
fn estimate(state: &State, kind: CallKind, now: Instant) -> Instant {
    let mut future = state.clone();
    for window in [&mut future.budget, &mut future.search] {
        for (_, answered) in &mut window.calls {
            answered.get_or_insert(now);
        }
    }
    let mut at = now;
    for _ in 0..=state.queued {
        at = match future.slot(kind, at) {
            Slot::At(later) => later,
            Slot::Now | Slot::AfterAnAnswer => at,
        };
        let call = future.admit(kind);
        future.answered(call, at);
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(calls: u32, seconds: u64) -> RateLimit {
        RateLimit {
            calls,
            per: Duration::from_secs(seconds),
        }
    }

    /// Largest number of starts inside any window of `per`.
    fn busiest_window(starts: &[Instant], per: Duration) -> usize {
        starts
            .iter()
            .map(|first| {
                starts
                    .iter()
                    .filter(|start| **start >= *first && **start < *first + per)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn three_hundred_calls_never_exceed_a_hundred_in_any_minute() {
        let pacer = std::sync::Arc::new(Pacer::new(budget(100, 60)));
        let begin = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..300 {
            let pacer = pacer.clone();
            tasks.push(tokio::spawn(async move {
                // The caller has all the time it needs; the pacer's one-window cap still applies
                // to each call's own wait, so later calls retry when refused.
                loop {
                    match pacer.admit(CallKind::Regular, None).await {
                        Ok(_answered_at_once) => return Instant::now(),
                        Err(PipedriveError::RateLimited { retry_after, .. }) => {
                            tokio::time::sleep(retry_after / 2).await;
                        }
                        Err(other) => panic!("unexpected {other}"),
                    }
                }
            }));
        }
        let mut starts = Vec::new();
        for task in tasks {
            starts.push(task.await.expect("the task ends"));
        }
        starts.sort();
        assert_eq!(busiest_window(&starts, Duration::from_secs(60)), 100);
        // The budget is used, not wasted: 300 calls fit in a little over two windows.
        let span = *starts.last().expect("300 starts") - begin;
        assert!(span < Duration::from_secs(125), "{span:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn searches_also_keep_to_ten_per_two_seconds() {
        let pacer = Pacer::new(budget(100, 60));
        let mut starts = Vec::new();
        for _ in 0..30 {
            pacer
                .admit(CallKind::Search, None)
                .await
                .expect("within one window");
            starts.push(Instant::now());
        }
        assert_eq!(busiest_window(&starts, Duration::from_secs(2)), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_beyond_the_deadline_is_refused_with_the_delay() {
        let pacer = Pacer::new(budget(2, 60));
        pacer.admit(CallKind::Regular, None).await.expect("first");
        pacer.admit(CallKind::Regular, None).await.expect("second");
        let refused = pacer
            .admit(CallKind::Regular, Some(Duration::from_secs(5)))
            .await
            .expect_err("the next slot is a minute away");
        assert!(matches!(
            refused,
            PipedriveError::RateLimited { retry_after, daily: false } if retry_after > Duration::from_secs(55)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_burst_window_holds_and_a_spent_day_refuses() {
        let pacer = Pacer::new(budget(100, 60));
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-remaining", "0".parse().expect("header"));
        headers.insert("x-ratelimit-reset", "1.5".parse().expect("header"));
        pacer.observe(&headers);
        let before = Instant::now();
        pacer
            .admit(CallKind::Regular, None)
            .await
            .expect("held, then admitted");
        assert!(Instant::now() - before >= Duration::from_millis(1500));

        headers.insert(
            "x-daily-ratelimit-token-remaining",
            "0".parse().expect("header"),
        );
        pacer.observe(&headers);
        assert!(matches!(
            pacer.admit(CallKind::Regular, None).await,
            Err(PipedriveError::RateLimited { daily: true, .. })
        ));
    }
}
