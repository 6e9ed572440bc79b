//! Connections to the three kinds of Redis, behind one [`Conn`] that the
//! store's commands and scripts run on:
//! - one Redis (`redis_url`): the `redis` crate's connection manager, which
//!   reconnects by itself;
//! - Sentinel (`redis_sentinel`): the crate's sentinel client names the
//!   master; one multiplexed connection to it is kept until a call on it
//!   fails at the connection (the master died, or after a failover answers
//!   `READONLY` as a replica), then the next call asks the sentinels again,
//!   so writes go only to the current master;
//! - Cluster (`redis_cluster`): the crate's async cluster connection, which
//!   follows MOVED/ASK and slot changes; every script touches one slot (the
//!   key layout's hash tag), and a pipeline may not span slots.
//!
//! `rediss://` speaks TLS in each (rustls: the crate takes a CA bundle for
//! Sentinel and Cluster connections only with it), verified against the
//! system's roots or `store.redis_ca`.

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline, RedisError,
    RedisFuture, RedisResult, TlsCertificates, TlsMode, Value,
};
use tokio::sync::OnceCell;

use crate::config::{RedisConfig, RedisTarget};

/// A connection to whichever Redis is configured; cheap to clone.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Sentinel(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A node a full SCAN must visit: on a Cluster one master (SCAN covers only
/// the node it is sent to), otherwise the one Redis.
#[derive(Clone, Debug)]
pub enum ScanNode {
    Only,
    Master { host: String, port: u16 },
}

impl Conn {
    /// The nodes that together hold every key: each master of a Cluster
    /// (asked with one PING to all of them), or the one Redis.
    pub async fn scan_nodes(&mut self) -> RedisResult<Vec<ScanNode>> {
        let Conn::Cluster(c) = self else {
            return Ok(vec![ScanNode::Only]);
        };
        let all = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
        let Value::Map(answers) = c.route_command(redis::cmd("PING"), all).await? else {
            return Err(RedisError::from((
                redis::ErrorKind::Client,
                "cluster PING to all masters did not answer per node",
            )));
        };
        let mut nodes = Vec::new();
        for (address, _) in answers {
            let address: String = redis::from_redis_value(address)?;
            let parsed = address
                .rsplit_once(':')
                .and_then(|(host, port)| Some((host.to_string(), port.parse().ok()?)));
            let Some((host, port)) = parsed else {
                return Err(RedisError::from((
                    redis::ErrorKind::Client,
                    "cluster node address without a port",
                    address,
                )));
            };
            nodes.push(ScanNode::Master { host, port });
        }
        Ok(nodes)
    }

    /// One page of `SCAN cursor MATCH pattern COUNT 1000` on `node`: the
    /// next cursor (0 when done) and the names found.
    pub async fn scan_page(
        &mut self,
        node: &ScanNode,
        cursor: u64,
        pattern: &str,
    ) -> RedisResult<(u64, Vec<String>)> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000);
        match (self, node) {
            (Conn::Cluster(c), ScanNode::Master { host, port }) => {
                let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                Ok(redis::from_redis_value(c.route_command(cmd, to).await?)?)
            }
            (c, _) => cmd.query_async(c).await,
        }
    }
}

/// Makes and keeps the connection; nothing connects until the first call.
pub struct Connector {
    kind: Kind,
    timeout: Duration,
}

enum Kind {
    Single {
        client: Client,
        conn: OnceCell<ConnectionManager>,
    },
    Sentinel {
        client: tokio::sync::Mutex<SentinelClient>,
        /// The master's connection, until a call on it fails at the connection.
        conn: Mutex<Option<MultiplexedConnection>>,
    },
    Cluster {
        client: ClusterClient,
        conn: OnceCell<ClusterConnection>,
    },
}

fn certificates(ca_pem: &Option<Vec<u8>>) -> TlsCertificates {
    TlsCertificates {
        client_tls: None,
        root_cert: ca_pem.clone(),
    }
}

impl Connector {
    /// Check the settings; connects on first use.
    pub fn new(config: &RedisConfig, timeout: Duration) -> RedisResult<Connector> {
        let kind = match &config.target {
            RedisTarget::Url(url) => {
                let client = match (&config.ca_pem, url.starts_with("rediss://")) {
                    (Some(_), true) => {
                        Client::build_with_tls(url.as_str(), certificates(&config.ca_pem))?
                    }
                    _ => Client::open(url.as_str())?,
                };
                Kind::Single {
                    client,
                    conn: OnceCell::new(),
                }
            }
            RedisTarget::Sentinel {
                master_name,
                sentinels,
                db,
                password,
                tls,
            } => {
                let addrs = sentinels
                    .iter()
                    .map(|s| Ok(s.as_str().into_connection_info()?.addr().clone()))
                    .collect::<RedisResult<Vec<ConnectionAddr>>>()?;
                let mut b =
                    SentinelClientBuilder::new(addrs, master_name, SentinelServerType::Master)?
                        .set_client_to_redis_db(*db);
                if let Some(p) = password {
                    b = b.set_client_to_redis_password(p);
                }
                if *tls {
                    b = b
                        .set_client_to_redis_tls_mode(TlsMode::Secure)
                        .set_client_to_sentinel_tls_mode(TlsMode::Secure);
                    if config.ca_pem.is_some() {
                        b = b
                            .set_client_to_redis_certificates(certificates(&config.ca_pem))
                            .set_client_to_sentinel_certificates(certificates(&config.ca_pem));
                    }
                }
                Kind::Sentinel {
                    client: tokio::sync::Mutex::new(b.build()?),
                    conn: Mutex::new(None),
                }
            }
            RedisTarget::Cluster(nodes) => {
                let mut b = ClusterClient::builder(nodes.iter().map(String::as_str))
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(1);
                // `certs` also turns TLS on: only for rediss:// nodes.
                let tls = nodes.iter().any(|n| n.starts_with("rediss://"));
                if config.ca_pem.is_some() && tls {
                    b = b.certs(certificates(&config.ca_pem));
                }
                Kind::Cluster {
                    client: b.build()?,
                    conn: OnceCell::new(),
                }
            }
        };
        Ok(Connector { kind, timeout })
    }

    /// Whether this is a Redis Cluster (a pipeline may not span slots there).
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster { .. })
    }

    /// The connection, made now if there is none.
    pub async fn conn(&self) -> RedisResult<Conn> {
        match &self.kind {
            Kind::Single { client, conn } => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1);
                let manager = conn
                    .get_or_try_init(|| async {
                        ConnectionManager::new_lazy_with_config(client.clone(), config)
                    })
                    .await?;
                Ok(Conn::Single(manager.clone()))
            }
            Kind::Sentinel { client, conn } => {
                if let Some(c) = conn.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                    return Ok(Conn::Sentinel(c));
                }
                // One caller asks the sentinels; the others wait for its answer.
                let mut sentinel = client.lock().await;
                if let Some(c) = conn.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                    return Ok(Conn::Sentinel(c));
                }
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout));
                let master = sentinel.async_get_client().await?;
                let c = master
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                *conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                Ok(Conn::Sentinel(c))
            }
            Kind::Cluster { client, conn } => {
                let c = conn
                    .get_or_try_init(|| client.get_async_connection())
                    .await?;
                Ok(Conn::Cluster(c.clone()))
            }
        }
    }

    /// A call failed with `e` (`None`: no answer in time). With Sentinel, a
    /// failure of the connection or a `READONLY` answer (the node is a
    /// replica now) drops the master's connection: the next call asks the
    /// sentinels again.
    pub fn failed(&self, e: Option<&RedisError>) {
        let Kind::Sentinel { conn, .. } = &self.kind else {
            return;
        };
        let drop_it = match e {
            None => true,
            Some(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
            }
        };
        if drop_it {
            *conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}
