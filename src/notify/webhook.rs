//! Delivery of notification posts to the webhook: one task per route, so a
//! slow webhook answer for one route never holds another route's posts, and
//! one semaphore bounding how many posts are in flight at once. Within a
//! route, posts go out one after the other, in the order they were decided,
//! so a `recovered` post can never overtake the failure it ends.

use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use super::Counters;

/// Posts in flight at once, all routes together.
pub(super) const CONCURRENCY: usize = 4;
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
    pub(super) url: Uri,
    pub(super) timeout: Duration,
    pub(super) in_flight: Arc<Semaphore>,
    pub(super) counters: Counters,
}

impl Webhook {
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
            match post_json(&self.url, body, self.timeout).await {
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

/// POST `body` as JSON over plain HTTP/1.1 within `timeout`; a 2xx status is success.
async fn post_json(url: &Uri, body: &[u8], timeout: Duration) -> Attempt {
    let deadline = Instant::now() + timeout;
    let stream = match tokio::time::timeout_at(deadline, send(url, body)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Attempt::Failed(e),
        Err(_) => return Attempt::Failed(format!("not sent within {timeout:?}")),
    };
    match tokio::time::timeout_at(deadline, status(stream)).await {
        Ok(Ok(())) => Attempt::Answered,
        Ok(Err(e)) => Attempt::Failed(e),
        Err(_) => Attempt::NoAnswer,
    }
}

/// Connect and write the whole request.
async fn send(url: &Uri, body: &[u8]) -> Result<TcpStream, String> {
    let host = url.host().ok_or("webhook URL without host")?;
    let port = url.port_u16().unwrap_or(80);
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let mut stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nUser-Agent: tollgate/{}\r\nConnection: close\r\n\r\n",
        body.len(),
        env!("CARGO_PKG_VERSION")
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    stream.write_all(body).await.map_err(|e| e.to_string())?;
    Ok(stream)
}

/// Read the status line's code.
async fn status(mut stream: TcpStream) -> Result<(), String> {
    let mut answer = [0u8; 64];
    let n = stream.read(&mut answer).await.map_err(|e| e.to_string())?;
    let status_line = String::from_utf8_lossy(&answer[..n]);
    match status_line.split_whitespace().nth(1) {
        Some(code) if code.starts_with('2') => Ok(()),
        Some(code) => Err(format!("webhook answered {code}")),
        None => Err("webhook closed without an answer".into()),
    }
}
