//! The process's listening sockets, and whether they serve.
//!
//! Pingora binds a listener it did not inherit by retrying for 30 s and then
//! panics inside the service's thread ("Failed to build listeners"): the
//! process lives on without that service and `/healthz` answered 200. Here
//! [`Guarded`] wraps each listening service: it binds the addresses the
//! service did not inherit itself before Pingora looks (so a busy port is
//! one clear error at once), ends the process with status 1 when a service
//! cannot listen or stops on its own, and keeps [`Health`], which `/healthz`
//! answers from.
//!
//! Every listener gets `TCP_DEFER_ACCEPT`: the kernel hands a connection to
//! `accept()` only once the client's first bytes have arrived. When a process
//! stops accepting (the end of its 5 s window after a hand-over, or a
//! shutdown) Pingora drops every accepted connection whose request it has
//! not read yet; connections it has not accepted stay queued on the socket
//! that the next process shares. Without the option, a connection accepted a
//! moment before the request arrived was closed unanswered (1–19 per reload
//! when ten reloads overlapped under 32 clients); with it, each accepted
//! connection already holds its request, which Pingora reads before it
//! checks for shutdown.
//!
//! The readers below (netlink, `/proc`) tell which process holds a listening socket:
//! `serve -u` uses them to find, before it asks for the old process's
//! sockets, a configured address that it would have to bind and cannot.

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use async_trait::async_trait;
use futures::FutureExt;
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::{ServiceReadyNotifier, ServiceWithDependents};
use socket2::{Domain, Socket, Type};

/// Pingora's own listen backlog.
const BACKLOG: i32 = 65535;

/// How long (seconds) the kernel waits for a client's first bytes before it
/// passes the connection to `accept()` anyway.
const DEFER_ACCEPT_SECONDS: libc::c_int = 5;

/// A listening TCP socket on `addr`, as Pingora makes one (`SO_REUSEADDR`,
/// non-blocking, close-on-exec), with `TCP_DEFER_ACCEPT`.
pub fn bind(addr: SocketAddr) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    defer_accept(sock.as_raw_fd())?;
    sock.listen(BACKLOG)?;
    Ok(sock)
}

/// Whether this process could bind `addr` now (bound, then closed at once).
pub fn probe(addr: SocketAddr) -> io::Result<()> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())
}

/// Set `TCP_DEFER_ACCEPT` on a listening socket (also on one inherited from
/// an older version, which was made without it; the option is the socket's,
/// so every process sharing it gets it).
fn defer_accept(fd: RawFd) -> io::Result<()> {
    let secs: libc::c_int = DEFER_ACCEPT_SECONDS;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local;
    // `fd` is a descriptor this process holds (a bad one only yields EBADF).
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What `/healthz` reports for one listening service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Registered; its listeners are not built yet.
    Starting,
    /// Every one of its listeners is accepting.
    Accepting,
    /// It no longer accepts, and why.
    Stopped(String),
}

/// Whether every listening service of this process accepts.
#[derive(Clone, Default)]
pub struct Health(Arc<Mutex<Vec<(String, State)>>>);

impl Health {
    fn set(&self, name: &str, state: State) {
        if let Ok(mut services) = self.0.lock() {
            match services.iter_mut().find(|(n, _)| n == name) {
                Some((_, s)) => *s = state,
                None => services.push((name.to_string(), state)),
            }
        }
    }

    /// `Ok` while every registered service accepts on all its listeners;
    /// otherwise each one that does not, with its state.
    pub fn verdict(&self) -> Result<(), String> {
        let Ok(services) = self.0.lock() else {
            return Err("health state unavailable".into());
        };
        let bad: Vec<String> = services
            .iter()
            .filter_map(|(name, state)| match state {
                State::Accepting => None,
                State::Starting => Some(format!("{name}: starting, listeners not built yet")),
                State::Stopped(why) => Some(format!("{name}: {why}")),
            })
            .collect();
        if services.is_empty() {
            Err("no listening service registered".into())
        } else if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("; "))
        }
    }
}

/// A listening service that binds its own missing listeners, reports to
/// [`Health`], and ends the process (status 1) when it cannot serve.
pub struct Guarded<S> {
    inner: S,
    report: Report,
}

/// One service's entry in [`Health`].
#[derive(Clone)]
struct Report {
    name: String,
    health: Health,
}

impl<S: ServiceWithDependents> Guarded<S> {
    /// Wrap `inner`; it counts as starting from now on.
    pub fn new(inner: S, name: &str, health: &Health) -> Self {
        health.set(name, State::Starting);
        Guarded {
            inner,
            report: Report {
                name: name.to_string(),
                health: health.clone(),
            },
        }
    }

    /// Make sure every address has a listening socket in `fds` before
    /// Pingora builds its listeners from that table.
    fn listen_all(&self, fds: &ListenFds) {
        let report = &self.report;
        for addr in self.inner.listen_addresses().unwrap_or_default() {
            let held = fds.lock().get(&addr).copied();
            match held {
                Some(fd) => {
                    if let Err(e) = defer_accept(fd) {
                        log::warn!("{}: TCP_DEFER_ACCEPT on {addr}: {e}", report.name);
                    }
                }
                None => {
                    let sock = addr
                        .parse::<SocketAddr>()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
                        .and_then(bind);
                    match sock {
                        Ok(sock) => fds.lock().add(addr, sock.into_raw_fd()),
                        Err(e) => report.fail(format!("cannot listen on {addr}: {e}")),
                    }
                }
            }
        }
    }
}

impl Report {
    fn set(&self, state: State) {
        self.health.set(&self.name, state);
    }

    fn fail(&self, why: String) -> ! {
        log::error!("{}: {why}; exiting", self.name);
        self.set(State::Stopped(why));
        std::process::exit(1)
    }

    fn ended(&self, result: std::thread::Result<()>, shutting_down: bool) {
        match result {
            Ok(()) if shutting_down => self.set(State::Stopped("stopped".into())),
            Ok(()) => self.fail("the service stopped on its own".into()),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                self.fail(format!("the service failed: {what}"))
            }
        }
    }
}

#[async_trait]
impl<S: ServiceWithDependents + 'static> ServiceWithDependents for Guarded<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
        ready_notifier: ServiceReadyNotifier,
    ) {
        if let Some(fds) = &fds {
            self.listen_all(fds);
        }
        let report = self.report.clone();
        let mut watch = shutdown.clone();
        let mut run = std::pin::pin!(AssertUnwindSafe(self.inner.start_service(
            fds,
            shutdown,
            listeners_per_fd,
            ready_notifier,
        ))
        .catch_unwind());
        // One poll builds the listeners (each has its socket now, so nothing
        // there waits) and spawns their accept loops, which then run until
        // shutdown; a failure to build them is a panic, caught here.
        let first = futures::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx))).await;
        let result = match first {
            Poll::Ready(result) => result,
            Poll::Pending => {
                report.set(State::Accepting);
                loop {
                    tokio::select! {
                        result = &mut run => break result,
                        changed = watch.changed() => {
                            if changed.is_err() || *watch.borrow() {
                                report.set(State::Stopped(
                                    "shutting down, no longer accepting".into(),
                                ));
                                break run.await;
                            }
                        }
                    }
                }
            }
        };
        let shutting_down = *watch.borrow();
        report.ended(result, shutting_down);
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}

/// Listening TCP sockets in this network namespace: (address, inode).
///
/// Asked of the kernel over netlink (`sock_diag`, as `ss -ltn` does) for
/// listeners only: `/proc/net/tcp` also lists every connection and
/// TIME_WAIT entry (18,000 lines under the reload test's load, 0.1–0.2 s to
/// read, which made `serve -u` take seconds to start).
/// An error (netlink not allowed, e.g. by a unit's `RestrictAddressFamilies`)
/// means "unknown".
pub fn tcp_listeners() -> io::Result<Vec<(SocketAddr, u64)>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        diag_listeners(family, &mut out)
            .inspect_err(|e| log::warn!("cannot list listening sockets (sock_diag): {e}"))?;
    }
    Ok(out)
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;

fn diag_listeners(family: i32, out: &mut Vec<(SocketAddr, u64)>) -> io::Result<()> {
    use std::io::Read;
    let sock = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::DGRAM,
        Some(socket2::Protocol::from(NETLINK_SOCK_DIAG)),
    )?;
    // nlmsghdr (16 bytes) + inet_diag_req_v2 (56 bytes), native endian.
    let mut req = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req.extend_from_slice(&flags.to_ne_bytes());
    req.extend_from_slice(&[0; 8]); // seq, pid
    req.extend_from_slice(&[family as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    req.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    req.extend_from_slice(&[0; 48]); // inet_diag_sockid: any
    sock.send(&req)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = (&sock).read(&mut buf)?;
        let mut msg = &buf[..n];
        while msg.len() >= 16 {
            let len = u32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize;
            let kind = u16::from_ne_bytes([msg[4], msg[5]]);
            if len < 16 || len > msg.len() {
                return Ok(());
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => return Err(io::Error::other("netlink error")),
                _ => {
                    if let Some(found) = diag_msg(&msg[16..len]) {
                        out.push(found);
                    }
                }
            }
            // Messages are 4-byte aligned.
            msg = msg.get((len + 3) & !3..).unwrap_or_default();
        }
        if n == 0 {
            return Ok(());
        }
    }
}

/// One `inet_diag_msg`: family, state, timer, retrans, then the socket id
/// (source port big-endian at 4, source address at 8), inode at 68.
fn diag_msg(m: &[u8]) -> Option<(SocketAddr, u64)> {
    let port = u16::from_be_bytes([*m.get(4)?, *m.get(5)?]);
    let ip = match i32::from(*m.first()?) {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::new(m[8], m[9], m[10], m[11])),
        libc::AF_INET6 => {
            let bytes: [u8; 16] = m.get(8..24)?.try_into().ok()?;
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    let inode = u32::from_ne_bytes(m.get(68..72)?.try_into().ok()?);
    Some((SocketAddr::new(ip, port), u64::from(inode)))
}

/// Inodes of the sockets process `pid` holds; `None` when its descriptors
/// cannot be read (gone, or another user's).
pub fn socket_inodes(pid: u32) -> Option<HashSet<u64>> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(
        dir.filter_map(|e| {
            let link = std::fs::read_link(e.ok()?.path()).ok()?;
            link.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect(),
    )
}

/// Whether process `pid` holds a listening socket on `addr`; `None` when
/// that cannot be told.
pub fn held_by(pid: u32, addr: SocketAddr) -> Option<bool> {
    let inodes = socket_inodes(pid)?;
    Some(
        tcp_listeners()
            .ok()?
            .iter()
            .any(|(a, inode)| *a == addr && inodes.contains(inode)),
    )
}

/// Whether any process holds a listening socket on `addr`; `None` when
/// that cannot be told.
pub fn listened_on(addr: SocketAddr) -> Option<bool> {
    Some(tcp_listeners().ok()?.iter().any(|(a, _)| *a == addr))
}

/// Inodes of the listening Unix sockets bound to `path` (as bound: Pingora
/// binds `upgrade_sock` as configured).
pub fn unix_listeners(path: &str) -> Vec<u64> {
    let Ok(text) = std::fs::read_to_string("/proc/self/net/unix") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            // __SO_ACCEPTCON: the socket listens.
            let listening = flags & 0x0001_0000 != 0;
            (listening && f.get(7..)?.join(" ") == path)
                .then(|| f.get(6)?.parse().ok())
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_sees_its_own_listener_and_not_a_free_port() {
        let sock = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(listened_on(addr), Some(true));
        assert_eq!(held_by(std::process::id(), addr), Some(true));
        assert!(probe(addr).is_err(), "a held port must not probe free");
        drop(sock);
        assert_eq!(listened_on(addr), Some(false));
        assert!(probe(addr).is_ok());
        // IPv6, where the host has it.
        if let Ok(sock) = bind("[::1]:0".parse().unwrap()) {
            let addr = sock.local_addr().unwrap().as_socket().unwrap();
            assert_eq!(held_by(std::process::id(), addr), Some(true));
        }
    }

    #[test]
    fn a_listening_unix_socket_is_found_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("up.sock");
        let path = path.to_str().unwrap();
        assert!(unix_listeners(path).is_empty());
        let l = std::os::unix::net::UnixListener::bind(path).unwrap();
        assert_eq!(unix_listeners(path).len(), 1);
        drop(l);
        assert!(unix_listeners(path).is_empty());
    }

    #[test]
    fn health_is_ok_only_while_every_service_accepts() {
        let h = Health::default();
        assert!(h.verdict().is_err(), "nothing registered is not healthy");
        h.set("proxy", State::Starting);
        h.set("admin", State::Accepting);
        let why = h.verdict().unwrap_err();
        assert!(why.contains("proxy: starting"), "{why}");
        h.set("proxy", State::Accepting);
        assert_eq!(h.verdict(), Ok(()));
        h.set(
            "proxy",
            State::Stopped("shutting down, no longer accepting".into()),
        );
        let why = h.verdict().unwrap_err();
        assert_eq!(why, "proxy: shutting down, no longer accepting");
    }
}
