//! Delivery of notification posts to the webhook: one task per route, so a
//! slow webhook answer for one route never holds another route's posts, and
//! one semaphore bounding how many posts are in flight at once. Within a
//! route, posts go out one after the other, in the order they were decided,
//! so a `recovered` post can never overtake the failure it ends.

use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use pingora::connectors::TransportConnector;
use pingora::http::RequestHeader;
use pingora::protocols::http::v1::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use super::Counters;

/// Posts in flight at once, all routes together.
const CONCURRENCY: usize = 4;
/// Attempts per post, and the pause before the second (doubling after).
const ATTEMPTS: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// What one attempt came to.
enum Attempt {
    /// The webhook answered 2xx.
    Answered,
    /// The post was written, and no answer came before the timeout: the
    /// webhook has it (or part of it), so it is not sent again.
    NoAnswer,
    /// Nothing delivered (connect or write failed or timed out), or the
    /// webhook refused it (a non-2xx answer): worth another attempt.
    Failed(String),
}

/// Where and how posts go; shared by every route's delivery task.
pub(super) struct Webhook {
    url: Uri,
    timeout: Duration,
    in_flight: Semaphore,
    counters: Counters,
    connector: TransportConnector,
}

impl Webhook {
    pub(super) fn new(url: Uri, timeout: Duration, counters: Counters) -> Webhook {
        Webhook {
            url,
            timeout,
            in_flight: Semaphore::new(CONCURRENCY),
            counters,
            connector: TransportConnector::new(None),
        }
    }

    /// Deliver one route's posts, in order, until its queue closes.
    pub(super) async fn serve(self: Arc<Self>, mut queue: mpsc::Receiver<Vec<u8>>) {
        while let Some(body) = queue.recv().await {
            let Ok(_permit) = self.in_flight.acquire().await else {
                return;
            };
            self.deliver(&body).await;
        }
    }

    /// Post `body`, retrying what did not arrive; count the outcome once:
    /// `sent`, `timeout` (arrived, unanswered) or `failed` (never arrived).
    async fn deliver(&self, body: &[u8]) {
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            match post_json(&self.connector, &self.url, body, self.timeout).await {
                Attempt::Answered => {
                    self.counters.sent.inc();
                    return;
                }
                Attempt::NoAnswer => {
                    log::warn!(target: "tollgate::notify", "webhook attempt {attempt}: posted, no answer within {:?}", self.timeout);
                    self.counters.timeout.inc();
                    return;
                }
                Attempt::Failed(e) => {
                    log::warn!(target: "tollgate::notify", "webhook attempt {attempt}: {e}")
                }
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
        self.counters.failed.inc();
    }
}

/// POST `body` as JSON over plain HTTP/1.1 within `timeout`, with Pingora's
/// own HTTP/1 client (the one the race uses); a 2xx status is success.
async fn post_json(
    connector: &TransportConnector,
    url: &Uri,
    body: &[u8],
    timeout: Duration,
) -> Attempt {
    let deadline = Instant::now() + timeout;
    let mut session = match tokio::time::timeout_at(deadline, send(connector, url, body)).await {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => return Attempt::Failed(e),
        Err(_) => return Attempt::Failed(format!("not sent within {timeout:?}")),
    };
    match tokio::time::timeout_at(deadline, status(&mut session)).await {
        Ok(Ok(())) => Attempt::Answered,
        Ok(Err(e)) => Attempt::Failed(e),
        Err(_) => Attempt::NoAnswer,
    }
}

/// Connect and write the whole request.
async fn send(
    connector: &TransportConnector,
    url: &Uri,
    body: &[u8],
) -> Result<HttpSession, String> {
    let host = url.host().ok_or("webhook URL without host")?;
    let tls = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let addr = tokio::net::lookup_host((bare_host, port))
        .await
        .map_err(|e| format!("resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("resolve {host}: no address"))?;
    // https: verified against the system's roots, for the URL's host.
    let peer = HttpPeer::new(addr, tls, bare_host.to_string());
    let stream = connector
        .new_stream(&peer)
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let mut session = HttpSession::new_with_options(stream, &peer);
    let head = request_header(path, &format!("{host}:{port}"), body.len())?;
    session
        .write_request_header(head)
        .await
        .map_err(|e| format!("send: {e}"))?;
    session
        .write_body(body)
        .await
        .map_err(|e| format!("send: {e}"))?;
    session
        .finish_body()
        .await
        .map_err(|e| format!("send: {e}"))?;
    Ok(session)
}

fn request_header(
    path: &str,
    host: &str,
    content_length: usize,
) -> Result<Box<RequestHeader>, String> {
    let mut h =
        RequestHeader::build("POST", path.as_bytes(), Some(5)).map_err(|e| e.to_string())?;
    let headers = [
        ("Host", host.to_string()),
        ("Content-Type", "application/json".to_string()),
        ("Content-Length", content_length.to_string()),
        (
            "User-Agent",
            concat!("tollgate/", env!("CARGO_PKG_VERSION")).to_string(),
        ),
        ("Connection", "close".to_string()),
    ];
    for (name, value) in headers {
        h.insert_header(name, value)
            .map_err(|e| format!("request header {name}: {e}"))?;
    }
    Ok(Box::new(h))
}

/// Read the answer's status (informational 1xx answers skipped).
async fn status(session: &mut HttpSession) -> Result<(), String> {
    loop {
        session
            .read_response()
            .await
            .map_err(|e| format!("no answer: {e}"))?;
        match session.get_status() {
            Some(s) if s.is_informational() => continue,
            Some(s) if s.is_success() => return Ok(()),
            Some(s) => return Err(format!("webhook answered {}", s.as_u16())),
            None => return Err("webhook answered no status".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A webhook on a free port that reads one request (head and
    /// `Content-Length` body), hands it over, then answers `answer` (nothing
    /// if empty, holding the connection open).
    async fn hook(answer: &'static str) -> (Uri, tokio::sync::oneshot::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook?x=1", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 1024];
            loop {
                let n = s.read(&mut chunk).await.unwrap();
                got.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .unwrap()
                        .parse()
                        .unwrap();
                    if body.len() >= len {
                        break;
                    }
                }
                assert!(n > 0, "closed before the whole request: {text:?}");
            }
            let _ = tx.send(String::from_utf8_lossy(&got).to_string());
            if answer.is_empty() {
                tokio::time::sleep(Duration::from_secs(30)).await;
            } else {
                s.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        (url.parse().unwrap(), rx)
    }

    async fn post(url: &Uri, timeout_ms: u64) -> Attempt {
        let connector = TransportConnector::new(None);
        let body = br#"{"route":"a"}"#;
        post_json(&connector, url, body, Duration::from_millis(timeout_ms)).await
    }

    #[tokio::test]
    async fn a_2xx_answer_is_sent_and_the_request_is_a_json_post() {
        let (url, got) = hook("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n").await;
        assert!(matches!(post(&url, 5000).await, Attempt::Answered));
        let got = got.await.unwrap();
        assert!(got.starts_with("POST /hook?x=1 HTTP/1.1\r\n"), "{got}");
        for h in [
            format!("Host: {}\r\n", url.authority().unwrap()),
            "Content-Type: application/json\r\n".into(),
            "Content-Length: 13\r\n".into(),
            "Connection: close\r\n".into(),
        ] {
            assert!(got.contains(&h), "{h:?} missing in {got}");
        }
        assert!(got.ends_with("\r\n\r\n{\"route\":\"a\"}"), "{got}");
    }

    #[tokio::test]
    async fn a_refusal_a_silence_and_no_listener_are_told_apart() {
        let (url, _got) =
            hook("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n").await;
        match post(&url, 5000).await {
            Attempt::Failed(e) => assert!(e.contains("500"), "{e}"),
            _ => panic!("a 500 is a failed attempt"),
        }
        let (url, got) = hook("").await;
        assert!(matches!(post(&url, 300).await, Attempt::NoAnswer));
        assert!(got.await.is_ok(), "the post arrived");
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let url: Uri = format!("http://{closed}/hook").parse().unwrap();
        match post(&url, 5000).await {
            Attempt::Failed(e) => assert!(e.starts_with("connect "), "{e}"),
            _ => panic!("nothing listening is a failed attempt"),
        }
    }
}
