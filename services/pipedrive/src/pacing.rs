//! Pacing: every call waits for a slot in the API token's budget, so LeadRelay never draws a 429
//! from Pipedrive rather than recovering from one.
//!
//! Two rolling windows apply: the configured budget (`LEADRELAY_PIPEDRIVE_RATE_LIMIT`, the seed's
//! 100 calls per 60 s by default) to every call, and Pipedrive's search limit (10 per 2 s) to
//! search calls as well. A slot is reserved before the call waits for it, so concurrent callers
//! queue in order instead of racing. Pipedrive's own signals tighten the pace: a burst window
//! reported spent (`x-ratelimit-remaining: 0`) or a 429 holds every call until the reset, and a
//! spent daily budget (`x-daily-ratelimit-token-remaining: 0`) fails calls at once, since it
//! only resets at the server's midnight.
//!
//! A call never waits longer than `max_wait` (one budget window by default, or less when the
//! caller's deadline is nearer): it is refused with the delay instead, which the RPC reports as
//! RESOURCE_EXHAUSTED with a retry hint.

use std::{collections::VecDeque, sync::Mutex, time::Duration};

use leadrelay_runtime::config::RateLimit;
use reqwest::header::HeaderMap;
use tokio::time::Instant;

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

/// One rolling window: at most `limit` calls in any `per`, with `margin` added to each window
/// so that the two ends' clocks and network delays cannot push two calls into one window.
#[derive(Debug)]
struct Window {
    limit: usize,
    per: Duration,
    /// Start times of the calls of the last window, reserved ones included, in order.
    starts: VecDeque<Instant>,
}

impl Window {
    fn new(limit: RateLimit) -> Self {
        let margin = (limit.per / 50).max(Duration::from_millis(20));
        Self {
            limit: usize::try_from(limit.calls).unwrap_or(usize::MAX).max(1),
            per: limit.per + margin,
            starts: VecDeque::new(),
        }
    }

    /// The earliest start at or after `earliest` that keeps this window within its limit.
    fn next_start(&mut self, now: Instant, earliest: Instant) -> Instant {
        while self
            .starts
            .front()
            .is_some_and(|start| *start + self.per <= now)
        {
            self.starts.pop_front();
        }
        let mut start = earliest;
        if self.starts.len() >= self.limit {
            start = start.max(self.starts[self.starts.len() - self.limit] + self.per);
        }
        // Starts stay ordered: a call never overtakes one reserved before it.
        if let Some(last) = self.starts.back() {
            start = start.max(*last);
        }
        start
    }

    fn reserve(&mut self, start: Instant) {
        self.starts.push_back(start);
    }
}

#[derive(Debug)]
struct State {
    budget: Window,
    search: Window,
    /// No call starts before this (a spent burst window or a 429).
    held_until: Option<Instant>,
    /// The daily budget was reported spent; calls fail until this.
    daily_spent_until: Option<Instant>,
}

/// The pace of one API token.
#[derive(Debug)]
pub struct Pacer {
    state: Mutex<State>,
    max_wait: Duration,
}

impl Pacer {
    /// A pacer for `budget`, with the search limit on top; calls wait at most one window.
    pub fn new(budget: RateLimit) -> Self {
        let budget = Window::new(budget);
        Self {
            max_wait: budget.per,
            state: Mutex::new(State {
                budget,
                search: Window::new(SEARCH_LIMIT),
                held_until: None,
                daily_spent_until: None,
            }),
        }
    }

    /// Waits for a slot for one call of `kind`, or refuses at once when the slot is more than
    /// `max_wait` (or `deadline`, when nearer) away.
    pub async fn admit(
        &self,
        kind: CallKind,
        deadline: Option<Duration>,
    ) -> Result<(), PipedriveError> {
        let start = self.reserve(kind, deadline)?;
        tokio::time::sleep_until(start).await;
        Ok(())
    }

    fn reserve(
        &self,
        kind: CallKind,
        deadline: Option<Duration>,
    ) -> Result<Instant, PipedriveError> {
        let now = Instant::now();
        let mut state = self.lock();
        if let Some(until) = state.daily_spent_until {
            if until > now {
                return Err(PipedriveError::RateLimited {
                    retry_after: until - now,
                    daily: true,
                });
            }
            state.daily_spent_until = None;
        }
        let mut start = state.held_until.map_or(now, |held| held.max(now));
        start = state.budget.next_start(now, start);
        if kind == CallKind::Search {
            start = state.search.next_start(now, start);
            // The budget window must still hold at the later start.
            start = state.budget.next_start(now, start);
        }
        let wait = start - now;
        let max_wait = deadline.map_or(self.max_wait, |deadline| deadline.min(self.max_wait));
        if wait > max_wait {
            return Err(PipedriveError::RateLimited {
                retry_after: wait,
                daily: false,
            });
        }
        state.budget.reserve(start);
        if kind == CallKind::Search {
            state.search.reserve(start);
        }
        Ok(start)
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

impl State {
    fn hold(&mut self, until: Instant) {
        self.held_until = Some(self.held_until.map_or(until, |held| held.max(until)));
    }
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
                        Ok(()) => return Instant::now(),
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
