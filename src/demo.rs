//! `tollgate demo`: demo market-data replicas on the config's backend
//! addresses, so the gateway can be tried without a data API. Served on a
//! thread of their own by Pingora's HTTP/1 server session (keep-alive
//! included). Only the `demo` command uses this; the tests bring their own
//! origin (`tests/common/origin.rs`).

use std::net::SocketAddr;
use std::time::Duration;

use pingora::http::ResponseHeader;
use pingora::protocols::http::v1::server::HttpSession;
use pingora::protocols::l4::stream::Stream;
use tokio::net::{TcpListener, TcpStream};

use tollgate::config::Config;

/// An answer: status, JSON body, and how long to take.
struct Reply {
    status: u16,
    body: String,
    delay: Duration,
}

/// A demo market-data replica. Replica 1 is fast but often has no data
/// (`"status": false`), replica 2 is steady, replica 3 is slow and
/// sometimes fails, so the race's winner changes from request to request.
struct DemoReplica {
    number: usize,
}

impl DemoReplica {
    fn reply(&self, target: &str) -> Reply {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        let (lo, hi, no_data, error) = match self.number {
            1 => (2, 12, 0.5, 0.0),
            2 => (8, 40, 0.0, 0.0),
            _ => (30, 150, 0.0, 0.1),
        };
        let delay = Duration::from_millis(rng.gen_range(lo..=hi));
        let path = target.split('?').next().unwrap_or("/");
        let symbol = path.rsplit('/').find(|s| !s.is_empty()).unwrap_or("AAPL");
        let roll: f64 = rng.gen();
        let served_by = format!("replica-{}", self.number);
        let body = if roll < error {
            return Reply {
                status: 500,
                body: r#"{"status": false, "message": "internal error"}"#.into(),
                delay,
            };
        } else if roll < error + no_data {
            serde_json::json!({"status": false, "served_by": served_by, "message": "no data"})
        } else {
            let close = 100.0
                + (symbol.bytes().map(u32::from).sum::<u32>() % 400) as f64
                + rng.gen_range(0.0..1.0);
            serde_json::json!({
                "status": true,
                "served_by": served_by,
                "path": path,
                "data": {"symbol": symbol, "close": (close * 100.0).round() / 100.0},
            })
        };
        Reply {
            status: 200,
            body: body.to_string(),
            delay,
        }
    }
}

/// Serve connections from `listener` until the runtime ends.
async fn serve(listener: TcpListener, replica: DemoReplica) {
    let replica = std::sync::Arc::new(replica);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let replica = replica.clone();
        tokio::spawn(async move { connection(stream, &replica).await });
    }
}

/// Answer the requests of one keep-alive connection.
async fn connection(stream: TcpStream, replica: &DemoReplica) {
    let _ = stream.set_nodelay(true);
    let mut session = HttpSession::new(Box::new(Stream::from(stream)));
    while let Ok(Some(_)) = session.read_request().await {
        let reply = replica.reply(&session.req_header().uri.to_string());
        tokio::time::sleep(reply.delay).await;
        if answer(&mut session, reply).await.is_err() {
            return;
        }
        match session.reuse().await {
            Ok(Some(reusable)) => session = HttpSession::new(reusable.into_parts().0),
            _ => return,
        }
    }
}

async fn answer(session: &mut HttpSession, reply: Reply) -> pingora::Result<()> {
    let mut head = ResponseHeader::build(reply.status, Some(2))?;
    head.insert_header("Content-Type", "application/json")?;
    head.insert_header("Content-Length", reply.body.len().to_string())?;
    session.write_response_header(Box::new(head)).await?;
    session.write_body(reply.body.as_bytes()).await?;
    session.finish_body().await?;
    Ok(())
}

/// Start demo replicas on every backend address of the config, on a thread
/// of their own. Fails if an address is taken.
pub fn start(config: &Config) -> std::io::Result<Vec<SocketAddr>> {
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for route in &config.routes {
        for b in &route.backends {
            if !addrs.contains(&b.addr) {
                addrs.push(b.addr);
            }
        }
    }
    let listeners = addrs
        .iter()
        .map(|a| {
            let l = std::net::TcpListener::bind(a)
                .map_err(|e| std::io::Error::new(e.kind(), format!("demo backend {a}: {e}")))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("demo-backends".into())
        .spawn(move || {
            runtime.block_on(async move {
                let mut tasks = Vec::new();
                for (i, l) in listeners.into_iter().enumerate() {
                    let Ok(listener) = TcpListener::from_std(l) else {
                        continue;
                    };
                    let replica = DemoReplica { number: i + 1 };
                    tasks.push(tokio::spawn(serve(listener, replica)));
                }
                for t in tasks {
                    let _ = t.await;
                }
            })
        })?;
    Ok(addrs)
}
