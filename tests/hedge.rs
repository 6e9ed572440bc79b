//! Hedging against real backends with a deterministic long tail: `auto`
//! learns the route's p95 and keeps the p99 far under the tail at a few
//! percent of extra attempts; the budget caps timer starts (and 0 starts
//! none); a failed attempt still starts the next backend at once; passive
//! health still skips a hung backend; `check` takes `auto` and refuses
//! what is neither a number nor `auto`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// `n` GETs of `path`, `workers` at a time: each request's status and time.
async fn load(gw: &Gateway, path: &str, n: usize, workers: usize) -> Vec<(u16, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let client = client();
    let url = gw.url(path);
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (next, client, url) = (next.clone(), client.clone(), url.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    let started = Instant::now();
                    let resp = client.get(&url).send().await.unwrap();
                    let status = resp.status().as_u16();
                    let _ = resp.bytes().await;
                    out.push((status, started.elapsed()));
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// The `q` quantile (nearest rank) of the times.
fn quantile(answers: &[(u16, Duration)], q: f64) -> Duration {
    let mut t: Vec<Duration> = answers.iter().map(|a| a.1).collect();
    t.sort();
    t[((q * t.len() as f64).ceil() as usize).clamp(1, t.len()) - 1]
}

async fn hedges(gw: &Gateway, route: &str) -> f64 {
    sample(
        &gw.metrics().await,
        &format!("tollgate_hedges_total{{route=\"{route}\"}}"),
    )
}

async fn delay_seconds(gw: &Gateway, route: &str) -> f64 {
    sample(
        &gw.metrics().await,
        &format!("tollgate_hedge_delay_seconds{{route=\"{route}\"}}"),
    )
}

/// Wait until the backends together received `want` requests (a hedge's
/// loser may reach its backend after the winner answered), then check that
/// no more arrive.
async fn wait_backend_requests(backends: &[&Origin], want: usize) {
    let total = || backends.iter().map(|o| o.hits()).sum::<usize>();
    let deadline = Instant::now() + Duration::from_secs(5);
    while total() < want {
        assert!(
            Instant::now() < deadline,
            "backends got {} requests, expected {want}",
            total()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        total(),
        want,
        "backends got more requests than attempts counted"
    );
}

/// Three replicas, every 25th answer 300 ms, the others 5 ms (a 4 % tail:
/// with exactly 5 %, the 95th percentile would be the tail's own edge).
/// After a warm-up, `auto` hedges after about the p95 of the fast answers:
/// the p99 is far below 300 ms and the extra attempts a few percent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_keeps_the_p99_far_below_the_tail_within_the_budget() {
    let o = [
        Origin::long_tail("a", 25, 5, 300).await,
        Origin::long_tail("b", 25, 5, 300).await,
        Origin::long_tail("c", 25, 5, 300).await,
    ];
    let refs: Vec<&Origin> = o.iter().collect();
    let gw = Gateway::start(
        &[route(
            "t",
            "/api/",
            &refs,
            "strategy: hedge\nhedge_after_ms: auto",
        )],
        "",
    )
    .await;
    assert_eq!(delay_seconds(&gw, "t").await, 0.05, "50 ms to start with");

    let warm = load(&gw, "/api/x", 100, 4).await;
    assert!(warm.iter().all(|a| a.0 == 200));
    let learned = delay_seconds(&gw, "t").await;
    let measured = load(&gw, "/api/x", 400, 4).await;
    assert!(measured.iter().all(|a| a.0 == 200));
    let (p50, p99) = (quantile(&measured, 0.5), quantile(&measured, 0.99));
    let requests = warm.len() + measured.len();
    let hedged = hedges(&gw, "t").await as usize;
    wait_backend_requests(&refs, requests + hedged).await;
    let slow = measured
        .iter()
        .filter(|a| a.1 >= Duration::from_millis(250))
        .count();
    println!(
        "auto: delay {:.1} ms after warm-up, p50 {p50:?}, p99 {p99:?}, {slow} of 400 \
         over 250 ms, {hedged} hedges for {requests} requests ({:.3} backend requests each)",
        learned * 1e3,
        (requests + hedged) as f64 / requests as f64,
    );
    // The observed p95 of 5 ms answers: at least their latency, below the
    // 50 ms it starts with (the next test sees it rise above 50 ms).
    assert!((0.005..0.045).contains(&learned), "delay {learned} s");
    // Unhedged, 16 of the 400 would take 300 ms and the p99 with them.
    assert!(p99 < Duration::from_millis(150), "p99 {p99:?}");
    assert!(slow <= 2, "{slow} answers took the tail");
    // Within the default budget (10 % of the requests plus 10), and well
    // under race's two extra attempts per request.
    assert!(hedged <= requests / 10 + 10, "{hedged} hedges");
    assert!(
        hedged >= 12,
        "only {hedged} hedges: the tail was not hedged"
    );
}

/// Where answers take longer than the 50 ms `auto` starts with (80 ms, every
/// 25th 600 ms), the delay rises to their p95: few hedges, a short p99.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_rises_above_its_start_for_a_slower_route() {
    let o = [
        Origin::long_tail("a", 25, 80, 600).await,
        Origin::long_tail("b", 25, 80, 600).await,
    ];
    let refs: Vec<&Origin> = o.iter().collect();
    let gw = Gateway::start(
        &[route(
            "t",
            "/api/",
            &refs,
            "strategy: hedge\nhedge_after_ms: auto",
        )],
        "",
    )
    .await;
    let warm = load(&gw, "/api/x", 40, 8).await;
    assert!(warm.iter().all(|a| a.0 == 200));
    let learned = delay_seconds(&gw, "t").await;
    let hedged_warm = hedges(&gw, "t").await as usize;
    let measured = load(&gw, "/api/x", 160, 8).await;
    assert!(measured.iter().all(|a| a.0 == 200));
    let p99 = quantile(&measured, 0.99);
    let hedged = hedges(&gw, "t").await as usize - hedged_warm;
    println!(
        "auto, 80 ms answers: delay {:.1} ms, p99 {p99:?}, {hedged} hedges for 160 requests \
         ({hedged_warm} in the warm-up at 50 ms)",
        learned * 1e3
    );
    assert!((0.08..0.3).contains(&learned), "delay {learned} s");
    assert!(p99 < Duration::from_millis(450), "p99 {p99:?}");
    // At 50 ms every request would hedge (up to the budget, 10 % plus 10).
    assert!(hedged <= 20, "{hedged} hedges");
}

/// A heavy tail (every 4th answer 200 ms) would make a 20 ms hedge start
/// for a quarter of the requests; a 5 % budget allows 5 % of them plus 10
/// per 10 s, and the requests past it wait for their first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_caps_timer_starts_and_the_rest_wait() {
    let o = [
        Origin::long_tail("a", 4, 2, 200).await,
        Origin::long_tail("b", 4, 2, 200).await,
    ];
    let refs: Vec<&Origin> = o.iter().collect();
    let gw = Gateway::start(
        &[route(
            "t",
            "/api/",
            &refs,
            "strategy: hedge\nhedge_after_ms: 20\nhedge_budget_percent: 5",
        )],
        "",
    )
    .await;
    let n = 300;
    let answers = load(&gw, "/api/x", n, 8).await;
    assert!(answers.iter().all(|a| a.0 == 200));
    let hedged = hedges(&gw, "t").await as usize;
    wait_backend_requests(&refs, n + hedged).await;
    let waited = answers
        .iter()
        .filter(|a| a.1 >= Duration::from_millis(180))
        .count();
    println!("budget 5 %: {hedged} hedges for {n} requests; {waited} waited out the tail");
    // 75 requests met a slow first attempt; 5 % of 300 plus 10 is 25.
    assert!(hedged <= n * 5 / 100 + 10, "{hedged} hedges");
    assert!(hedged >= 15, "{hedged} hedges: the budget was not used");
    assert!(
        waited >= 30,
        "only {waited} requests waited for a slow attempt"
    );
}

/// With `hedge_budget_percent: 0` the timer starts nothing (fixed or auto);
/// the same backends on a route with the default budget do get hedges. The
/// series exist, at 0, before any traffic: a race route's delay is 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_0_starts_no_timer_attempts() {
    let slow = Origin::json("slow", true, 150).await;
    let fast = Origin::json("fast", true, 0).await;
    let gw = Gateway::start(
        &[
            route(
                "fixed0",
                "/fixed0/",
                &[&slow, &fast],
                "strategy: hedge\nhedge_after_ms: 10\nhedge_budget_percent: 0",
            ),
            route(
                "auto0",
                "/auto0/",
                &[&slow, &fast],
                "strategy: hedge\nhedge_after_ms: auto\nhedge_budget_percent: 0",
            ),
            route(
                "fixed10",
                "/fixed10/",
                &[&slow, &fast],
                "strategy: hedge\nhedge_after_ms: 10",
            ),
            route("race", "/race/", &[&slow, &fast], ""),
        ],
        "",
    )
    .await;
    let m = gw.metrics().await;
    for (route, delay) in [
        ("fixed0", 0.01),
        ("auto0", 0.05),
        ("fixed10", 0.01),
        ("race", 0.0),
    ] {
        let series = format!("tollgate_hedge_delay_seconds{{route=\"{route}\"}} ");
        assert!(m.contains(&format!("{series}{delay}")), "{route}:\n{m}");
        assert!(m.contains(&format!("tollgate_hedges_total{{route=\"{route}\"}} 0")));
    }
    for prefix in ["/fixed0/", "/auto0/"] {
        for _ in 0..3 {
            let answers = load(&gw, &format!("{prefix}x"), 1, 1).await;
            assert_eq!(answers[0].0, 200);
            assert!(answers[0].1 >= Duration::from_millis(140), "{answers:?}");
        }
    }
    wait_backend_requests(&[&slow, &fast], 6).await;
    assert_eq!(fast.hits(), 0, "a timer attempt was started");
    for route in ["fixed0", "auto0"] {
        assert_eq!(hedges(&gw, route).await, 0.0);
    }
    // The control: with a budget, the timer starts the fast one.
    let answers = load(&gw, "/fixed10/x", 3, 1).await;
    assert!(answers
        .iter()
        .all(|a| a.0 == 200 && a.1 < Duration::from_millis(140)));
    assert_eq!(hedges(&gw, "fixed10").await, 3.0);
}

/// A first attempt that fails starts the next backend at once, whatever the
/// delay and the budget, and is not a hedge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_moves_on_at_once_and_is_no_hedge() {
    let broken = Origin::status(500, 0).await;
    let ok = Origin::json("ok", true, 0).await;
    let gw = Gateway::start(
        &[
            route(
                "auto0",
                "/auto0/",
                &[&broken, &ok],
                "strategy: hedge\nhedge_after_ms: auto\nhedge_budget_percent: 0",
            ),
            route(
                "slow",
                "/slow/",
                &[&broken, &ok],
                "strategy: hedge\nhedge_after_ms: 3000",
            ),
        ],
        "",
    )
    .await;
    for prefix in ["/auto0/", "/slow/"] {
        for _ in 0..3 {
            let answers = load(&gw, &format!("{prefix}x"), 1, 1).await;
            assert_eq!(answers[0].0, 200);
            // auto starts at 50 ms, the other waits 3 s: neither timer ran.
            assert!(answers[0].1 < Duration::from_millis(45), "{answers:?}");
        }
    }
    wait_backend_requests(&[&broken, &ok], 12).await;
    for route in ["auto0", "slow"] {
        assert_eq!(hedges(&gw, route).await, 0.0, "{route}");
    }
}

/// Passive health with `auto`: a hung first backend costs the first
/// requests the 50 ms start delay; after `failures` stalls it is skipped,
/// and requests stop waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_with_a_hung_backend_skips_it() {
    let hung = Origin::json("hung", true, 600_000).await;
    let a = Origin::json("a", true, 0).await;
    let gw = Gateway::start(
        &[route(
            "h",
            "/api/",
            &[&hung, &a],
            "strategy: hedge\nhedge_after_ms: auto\nhealth: {failures: 3, skip_seconds: 60}",
        )],
        "",
    )
    .await;
    for i in 1..=3 {
        let answers = load(&gw, "/api/x", 1, 1).await;
        assert_eq!(answers[0].0, 200);
        assert!(answers[0].1 >= Duration::from_millis(45), "{answers:?}");
        wait_until("the hung backend to get it", Duration::from_secs(5), || {
            hung.hits() == i
        })
        .await;
    }
    gw.wait_log("skipped for 60 s").await;
    let after = load(&gw, "/api/x", 10, 1).await;
    assert!(after.iter().all(|a| a.0 == 200));
    let p50 = quantile(&after, 0.5);
    assert!(p50 < Duration::from_millis(40), "p50 {p50:?}");
    assert_eq!(hung.hits(), 3, "the skipped backend got requests");
    assert_eq!(hedges(&gw, "h").await, 3.0);
}

/// `check` takes `auto` and every documented budget, and names the field of
/// a value that is neither.
#[test]
fn check_takes_auto_and_names_bad_hedge_values() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("t.yaml");
    let check = |extra: &str| {
        std::fs::write(
            &conf,
            format!(
                "routes:\n  - name: v1\n    prefix: /api/\n    backends: [\"http://127.0.0.1:9001\"]\n    strategy: hedge\n{extra}"
            ),
        )
        .unwrap();
        let (code, _, stderr) = tollgate(&["check"], &conf);
        (code, stderr)
    };
    for ok in [
        "    hedge_after_ms: auto\n",
        "    hedge_after_ms: 1\n    hedge_budget_percent: 0\n",
        "    hedge_after_ms: auto\n    hedge_budget_percent: 100\n",
    ] {
        let (code, stderr) = check(ok);
        assert_eq!(code, 0, "{ok}: {stderr}");
    }
    for (bad, want) in [
        (
            "    hedge_after_ms: soon\n",
            "routes[0].hedge_after_ms: invalid value: string \"soon\", expected a whole number of milliseconds or \"auto\"",
        ),
        (
            "    hedge_budget_percent: 150\n",
            "routes[0].hedge_budget_percent: must be at most 100, got 150",
        ),
        (
            "    hedge_budget_percent: -1\n",
            "routes[0].hedge_budget_percent: invalid type: integer `-1`, expected u64",
        ),
    ] {
        let (code, stderr) = check(bad);
        assert_eq!(code, 1, "{bad} accepted");
        assert!(stderr.contains(want), "expected {want:?} in:\n{stderr}");
    }
}
