//! Unit tests of the notifier's decisions: what is posted when, what a
//! recovery folds in, and the `no_data` share over its window.
#![allow(clippy::unwrap_used)]

use super::*;
use serde_json::Value;

fn counters() -> Counters {
    let c = |n: &str| IntCounter::new(n, "test").unwrap();
    Counters {
        sent: c("sent"),
        failed: c("failed"),
        timeout: c("timeout"),
        suppressed: c("suppressed"),
        dropped: c("dropped"),
    }
}

/// One route "t" with `min_interval`, and the receiving end of its queue.
fn one_route(min_interval: Duration) -> (Shared, mpsc::Receiver<Vec<u8>>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let shared = Shared {
        routes: vec![Arc::new(RouteSlot {
            name: "t".into(),
            answered: AtomicU64::new(0),
            no_data: AtomicU64::new(0),
            state: Mutex::new(RouteState::default()),
            queue: Some(tx),
        })],
        min_interval,
        counters: counters(),
    };
    (shared, rx)
}

fn failed(id: &str) -> Event {
    Event::Failed {
        reason: "upstream_failed",
        request_id: id.into(),
        backends: Vec::new(),
    }
}

fn recovered(id: &str) -> Event {
    Event::Recovered {
        request_id: id.into(),
    }
}

fn drain(rx: &mut mpsc::Receiver<Vec<u8>>) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(body) = rx.try_recv() {
        out.push(serde_json::from_slice(&body).unwrap());
    }
    out
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn a_recovery_folds_the_held_failures_and_no_summary_follows_it() {
    // The issue's case: failing from 0 to 25 s, min_interval 10 s.
    let (n, mut rx) = one_route(secs(10));
    let t0 = Instant::now();
    for s in 0..25 {
        n.on_event(&n.routes[0], failed(&format!("f{s}")), t0 + secs(s), s);
        n.flush(t0 + secs(s), false);
    }
    let p = drain(&mut rx);
    let kinds: Vec<_> = p
        .iter()
        .map(|p| (p["reason"].clone(), p["suppressed"].clone()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("upstream_failed".into(), 0.into()),
            ("upstream_failed".into(), 9.into()),
            ("upstream_failed".into(), 9.into())
        ],
        "{p:?}"
    );
    n.on_event(&n.routes[0], recovered("r"), t0 + secs(25), 25);
    let p = drain(&mut rx);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0]["reason"], "recovered");
    assert_eq!(p[0]["request_id"], "r");
    // f21..f24 were held after the summary at 20 s.
    assert_eq!(p[0]["suppressed_failures"]["upstream_failed"], 4, "{p:?}");
    for s in 26..60 {
        n.flush(t0 + secs(s), false);
    }
    n.flush(t0 + secs(60), true);
    assert_eq!(drain(&mut rx), Vec::<Value>::new());
    assert_eq!(n.counters.suppressed.get(), 9 + 9 + 4);
}

#[test]
fn a_flapping_route_posts_only_summaries_of_the_state_it_is_in() {
    let (n, mut rx) = one_route(secs(10));
    let t0 = Instant::now();
    n.on_event(&n.routes[0], failed("f0"), t0, 0);
    n.on_event(&n.routes[0], recovered("r1"), t0 + secs(1), 1);
    n.on_event(&n.routes[0], failed("f2"), t0 + secs(2), 2); // held
    n.on_event(&n.routes[0], recovered("r3"), t0 + secs(3), 3); // held, folds f2
    n.on_event(&n.routes[0], failed("f4"), t0 + secs(4), 4); // held; failing now
    assert_eq!(drain(&mut rx).len(), 2);
    n.flush(t0 + secs(12), false);
    let p = drain(&mut rx);
    assert_eq!(p.len(), 1, "only the failure summary: {p:?}");
    assert_eq!(
        (&p[0]["reason"], &p[0]["suppressed"], &p[0]["request_id"]),
        (&"upstream_failed".into(), &1.into(), &"f4".into())
    );
    // It recovers: the held recovery r3 and its folded f2 go with this one.
    n.on_event(&n.routes[0], recovered("r13"), t0 + secs(13), 13);
    let p = drain(&mut rx);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0]["reason"], "recovered");
    assert_eq!(p[0]["suppressed"], 1);
    assert_eq!(p[0]["suppressed_failures"]["upstream_failed"], 1);
    n.flush(t0 + secs(30), true);
    assert!(drain(&mut rx).is_empty());
}

#[test]
fn held_recovery_is_posted_when_due_with_what_it_folded() {
    let (n, mut rx) = one_route(secs(10));
    let t0 = Instant::now();
    n.on_event(&n.routes[0], failed("f0"), t0, 0);
    n.on_event(&n.routes[0], recovered("r1"), t0 + secs(1), 1);
    n.on_event(&n.routes[0], failed("f2"), t0 + secs(2), 2);
    n.on_event(&n.routes[0], failed("f3"), t0 + secs(3), 3);
    n.on_event(&n.routes[0], recovered("r4"), t0 + secs(4), 4);
    drain(&mut rx);
    n.flush(t0 + secs(10), false);
    assert!(
        drain(&mut rx).is_empty(),
        "the recovery window is still closed"
    );
    n.flush(t0 + secs(11), false);
    let p = drain(&mut rx);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0]["reason"], "recovered");
    assert_eq!(p[0]["request_id"], "r4");
    assert_eq!(p[0]["suppressed_failures"]["upstream_failed"], 2);
}

#[test]
fn a_post_that_finds_the_queue_full_is_dropped_and_counted() {
    let (n, _rx) = one_route(Duration::ZERO);
    let t0 = Instant::now();
    for i in 0..(QUEUE as u64 + 3) {
        n.on_event(&n.routes[0], failed("f"), t0 + Duration::from_millis(i), 0);
    }
    assert_eq!(n.counters.dropped.get(), 3);
    assert_eq!(n.counters.suppressed.get(), 0);
}

#[test]
fn share_window_counts_only_the_last_span() {
    let t0 = Instant::now();
    let mut w = ShareWindow::new(secs(10), t0, 0, 0);
    assert_eq!(w.observe(t0 + secs(5), 100, 60), (100, 60));
    assert_eq!(w.observe(t0 + secs(10), 120, 60), (120, 60));
    // The sample at 0 is now older than the window: counted from 5 s.
    assert_eq!(w.observe(t0 + secs(11), 130, 61), (30, 1));
    assert_eq!(w.observe(t0 + secs(40), 130, 61), (0, 0));
    assert!(w.samples.len() <= 2, "{:?}", w.samples);
}

#[test]
fn share_window_keeps_a_bounded_number_of_samples() {
    let t0 = Instant::now();
    let mut w = ShareWindow::new(secs(3600), t0, 0, 0);
    for i in 0..20_000u64 {
        w.observe(t0 + Duration::from_millis(250 * i), i, 0);
    }
    assert!(w.samples.len() <= 66, "{}", w.samples.len());
}

#[test]
fn no_data_rule_needs_the_ratio_and_enough_answers() {
    let rule = NoDataRule {
        ratio: 0.5,
        window: secs(60),
    };
    assert_eq!(rule.judge((9, 9)), None, "too few answers");
    assert_eq!(rule.judge((100, 10)), None, "10% is a healthy route");
    assert_eq!(rule.judge((100, 49)), None);
    let share = rule.judge((100, 50)).unwrap();
    assert_eq!((share.share, share.requests), (0.5, 100));
    let all = NoDataRule { ratio: 1.0, ..rule };
    assert_eq!(all.judge((100, 99)), None);
    assert!(all.judge((10, 10)).is_some());
}

#[test]
fn no_data_warning_posts_once_per_interval() {
    let (n, mut rx) = one_route(secs(10));
    let t0 = Instant::now();
    let share = NoDataShare {
        share: 0.75,
        requests: 40,
        window: secs(60),
    };
    n.no_data_warning(&n.routes[0], share, t0);
    n.no_data_warning(&n.routes[0], share, t0 + secs(5));
    n.no_data_warning(&n.routes[0], share, t0 + secs(10));
    let p = drain(&mut rx);
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!(p[0]["reason"], "no_data");
    assert_eq!(p[0]["no_data_share"], 0.75);
    assert_eq!(p[0]["window_requests"], 40);
    assert_eq!(p[0]["window_seconds"], 60);
    // A no_data warning is not an outage: no recovery follows it.
    n.flush(t0 + secs(30), true);
    assert!(drain(&mut rx).is_empty());
}
