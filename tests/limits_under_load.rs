//! Client connection limits against the real gateway: the deadline for a
//! whole request header (`limits.request_header_timeout_ms`) and the cap on
//! open client connections (`limits.max_client_connections`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn keepalive_get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\n\r\n")
}

/// Read one answer with a `Content-Length` body; its status.
async fn read_answer(s: &mut TcpStream) -> u16 {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("no answer within 10 s")
            .unwrap();
        assert!(n > 0, "closed before a whole answer: {got:?}");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap();
            if body.len() >= len {
                return head.split_whitespace().nth(1).unwrap().parse().unwrap();
            }
        }
    }
}

/// Wait (at most `within`) for the peer to close; the bytes it sent first.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => panic!("still open after {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

async fn gauge(gw: &Gateway, series: &str) -> f64 {
    sample(&gw.metrics().await, series)
}

async fn wait_metric(gw: &Gateway, series: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = gauge(gw, series).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{series} is {got}, want {want}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const DEADLINE: &str = "limits:\n  request_header_timeout_ms: 500\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_request_header_is_closed_at_its_deadline() {
    let o = Origin::json("a", true, 0).await;
    let gw = Gateway::start(&[route("t", "/api/", &[&o], "")], DEADLINE).await;

    // One byte every 100 ms: each read is quick, the header as a whole is not.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    let request = keepalive_get("/api/x");
    let trickle = async {
        for b in request.as_bytes() {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // The whole request would take 100 ms × its length (several seconds).
    assert!(request.len() > 40);
    let _ = tokio::time::timeout(Duration::from_secs(3), trickle).await;
    let got = closed_within(&mut s, Duration::from_secs(1)).await;
    let took = started.elapsed();
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(o.hits(), 0);
    wait_metric(&gw, "tollgate_request_header_timeouts_total", 1.0).await;

    // A connection that sends nothing is closed at the deadline too, counted
    // from its accept: the kernel holds it until its first byte or for
    // TCP_DEFER_ACCEPT's 5 s (plus a SYN-ACK retransmit) before that.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(12))
        .await
        .is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_starts_at_each_request_not_at_the_connection() {
    let o = Origin::json("a", true, 0).await;
    let gw = Gateway::start(&[route("t", "/api/", &[&o], "")], DEADLINE).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(keepalive_get("/api/1").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_answer(&mut s).await, 200);
    // Idle between requests for longer than the header deadline: that wait
    // is the keep-alive timeout's (60 s), not the header's.
    tokio::time::sleep(Duration::from_millis(900)).await;
    // A header sent in two parts, 300 ms apart, within its 500 ms.
    let request = keepalive_get("/api/2");
    let (a, b) = request.split_at(10);
    s.write_all(a.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(b.as_bytes()).await.unwrap();
    assert_eq!(read_answer(&mut s).await, 200);
    assert_eq!(o.hits(), 2);
    assert_eq!(
        gauge(&gw, "tollgate_request_header_timeouts_total").await,
        0.0
    );
}

async fn open_and_use(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(keepalive_get("/api/x").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_answer(&mut s).await, 200);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_at_once() {
    let o = Origin::json("a", true, 0).await;
    let gw = Gateway::start(
        &[route("t", "/api/", &[&o], "")],
        "limits:\n  max_client_connections: 2\n",
    )
    .await;
    // The harness's readiness probe opened (and closed) one connection.
    wait_metric(&gw, "tollgate_client_connections", 0.0).await;
    let first = open_and_use(gw.addr).await;
    let _second = open_and_use(gw.addr).await;
    wait_metric(&gw, "tollgate_client_connections", 2.0).await;

    // The third is accepted and closed without an answer.
    let mut third = TcpStream::connect(gw.addr).await.unwrap();
    let _ = third.write_all(keepalive_get("/api/x").as_bytes()).await;
    let got = closed_within(&mut third, Duration::from_secs(2)).await;
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    wait_metric(&gw, "tollgate_client_connections_refused_total", 1.0).await;
    assert_eq!(gauge(&gw, "tollgate_client_connections").await, 2.0);

    // Once one closes, a new connection is served again.
    drop(first);
    wait_metric(&gw, "tollgate_client_connections", 1.0).await;
    let _again = open_and_use(gw.addr).await;
    assert_eq!(
        gauge(&gw, "tollgate_client_connections_refused_total").await,
        1.0
    );
    assert_eq!(o.hits(), 3);
}
