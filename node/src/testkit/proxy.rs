//! A UDP fault proxy for one direction of a QUIC link: the dialling node sends to
//! [`FaultProxy::addr`], the proxy forwards to the dialled node's real listen address and relays
//! the answers back. One socket faces the dialler; for each dialler source address the proxy
//! opens a socket of its own towards the target, so the target sees one stable peer address per
//! dialler. The [`Mode`] can be switched at run time: pass everything, drop everything both ways
//! (a cut link), or drop a seeded random share of datagrams (a lossy link).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::task::JoinSet;

/// Largest UDP datagram relayed.
const DATAGRAM_MAX: usize = 65_536;
/// Most dialler addresses served at once; the least recently active one is dropped beyond it.
const SESSIONS_MAX: usize = 64;

/// What the proxy does with each datagram, in both directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Forward nothing: the link is cut.
    Drop,
    /// Drop this many datagrams per thousand (seeded, so a run's pattern is reproducible given
    /// the same arrival order); 0 is [`Mode::Pass`], 1000 and more is [`Mode::Drop`].
    Lossy(u16),
}

impl Mode {
    fn encode(self) -> u32 {
        match self {
            Mode::Pass => 0,
            Mode::Drop => 1,
            Mode::Lossy(p) => (2 << 16) | u32::from(p),
        }
    }

    fn decode(v: u32) -> Mode {
        match v >> 16 {
            0 if v == 0 => Mode::Pass,
            0 => Mode::Drop,
            _ => Mode::Lossy((v & 0xffff) as u16),
        }
    }
}

/// A mode shared by several proxies (e.g. both directions of one link), switchable at run time.
#[derive(Clone, Debug)]
pub struct ModeSwitch(Arc<AtomicU32>);

impl ModeSwitch {
    pub fn new(mode: Mode) -> ModeSwitch {
        ModeSwitch(Arc::new(AtomicU32::new(mode.encode())))
    }

    pub fn set(&self, mode: Mode) {
        self.0.store(mode.encode(), Ordering::SeqCst);
    }

    pub fn get(&self) -> Mode {
        Mode::decode(self.0.load(Ordering::SeqCst))
    }
}

/// Datagram counters of one proxy, both directions together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    pub forwarded: u64,
    pub dropped: u64,
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    dropped: AtomicU64,
}

/// Decides the fate of each datagram.
struct Gate {
    mode: ModeSwitch,
    rng: Mutex<StdRng>,
    counters: Counters,
}

impl Gate {
    fn pass(&self) -> bool {
        let ok = match self.mode.get() {
            Mode::Pass => true,
            Mode::Drop => false,
            Mode::Lossy(p) => {
                let roll: u16 = self
                    .rng
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .random_range(0..1000);
                roll >= p
            }
        };
        let counter = if ok {
            &self.counters.forwarded
        } else {
            &self.counters.dropped
        };
        counter.fetch_add(1, Ordering::Relaxed);
        ok
    }
}

/// A running proxy; it stops (and frees its sockets) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    target: SocketAddr,
    gate: Arc<Gate>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy in [`Mode::Pass`] on a free port of the target's loopback family, forwarding to
    /// `target`. Must be called inside a tokio runtime.
    pub async fn start(target: SocketAddr) -> io::Result<FaultProxy> {
        FaultProxy::start_with(target, ModeSwitch::new(Mode::Pass), 0).await
    }

    /// A proxy whose mode is `mode` (possibly shared with other proxies), with a seeded RNG for
    /// [`Mode::Lossy`].
    pub async fn start_with(
        target: SocketAddr,
        mode: ModeSwitch,
        seed: u64,
    ) -> io::Result<FaultProxy> {
        let local_ip = local_ip_for(target);
        let front = Arc::new(UdpSocket::bind(SocketAddr::new(local_ip, 0)).await?);
        let addr = front.local_addr()?;
        let gate = Arc::new(Gate {
            mode,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            counters: Counters::default(),
        });
        let task = tokio::spawn(serve(front, target, local_ip, gate.clone()));
        Ok(FaultProxy {
            addr,
            target,
            gate,
            task,
        })
    }

    /// Where the dialler must send (put this in its `[[peers]] addr`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The dialled node's real address.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    pub fn set(&self, mode: Mode) {
        self.gate.mode.set(mode);
    }

    pub fn mode(&self) -> Mode {
        self.gate.mode.get()
    }

    /// The switch this proxy obeys (shared with whoever else was given it).
    pub fn switch(&self) -> ModeSwitch {
        self.gate.mode.clone()
    }

    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            forwarded: self.gate.counters.forwarded.load(Ordering::Relaxed),
            dropped: self.gate.counters.dropped.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Dropping the serving future drops its JoinSet, which aborts every session task.
        self.task.abort();
    }
}

fn local_ip_for(target: SocketAddr) -> IpAddr {
    match target.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

struct Session {
    upstream: Arc<UdpSocket>,
    last_active: Instant,
    /// Stops the session's return path when the session is evicted.
    abort: tokio::task::AbortHandle,
}

async fn serve(front: Arc<UdpSocket>, target: SocketAddr, local_ip: IpAddr, gate: Arc<Gate>) {
    let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; DATAGRAM_MAX];
    loop {
        // Errors on a UDP socket (e.g. an ICMP unreachable reported on a later call) are
        // transient: keep serving.
        let (n, client) = match front.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        // Reap finished session tasks so the JoinSet does not grow.
        while tasks.try_join_next().is_some() {}
        if !sessions.contains_key(&client) {
            if sessions.len() >= SESSIONS_MAX {
                if let Some(oldest) = sessions
                    .iter()
                    .min_by_key(|(_, s)| s.last_active)
                    .map(|(a, _)| *a)
                {
                    if let Some(s) = sessions.remove(&oldest) {
                        s.abort.abort();
                    }
                }
            }
            let upstream = match open_upstream(local_ip, target).await {
                Ok(s) => Arc::new(s),
                Err(_) => continue,
            };
            let abort = tasks.spawn(relay_back(
                upstream.clone(),
                front.clone(),
                client,
                gate.clone(),
            ));
            sessions.insert(
                client,
                Session {
                    upstream,
                    last_active: Instant::now(),
                    abort,
                },
            );
        }
        let Some(session) = sessions.get_mut(&client) else {
            continue;
        };
        session.last_active = Instant::now();
        if gate.pass() {
            // A refused send (target down) is what a real network would do: the datagram is lost.
            let _ = session.upstream.send(&buf[..n]).await;
        }
    }
}

async fn open_upstream(local_ip: IpAddr, target: SocketAddr) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddr::new(local_ip, 0)).await?;
    s.connect(target).await?;
    Ok(s)
}

/// The target's answers to one dialler.
async fn relay_back(
    upstream: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    gate: Arc<Gate>,
) {
    let mut buf = vec![0u8; DATAGRAM_MAX];
    loop {
        let n = match upstream.recv(&mut buf).await {
            Ok(n) => n,
            // ECONNREFUSED while the target is down (killed, restarting): keep the session.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        if gate.pass() {
            let _ = front.send_to(&buf[..n], client).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                let (n, from) = s.recv_from(&mut buf).await.unwrap();
                s.send_to(&buf[..n], from).await.unwrap();
            }
        });
        (addr, task)
    }

    /// Sends `msg` through the proxy and waits up to `wait` for its echo.
    async fn round_trip(client: &UdpSocket, to: SocketAddr, msg: &[u8], wait: Duration) -> bool {
        client.send_to(msg, to).await.unwrap();
        let mut buf = [0u8; 2048];
        loop {
            match tokio::time::timeout(wait, client.recv_from(&mut buf)).await {
                Ok(Ok((n, _))) if &buf[..n] == msg => return true,
                Ok(Ok(_)) => continue, // a late echo of an earlier datagram
                Ok(Err(e)) => panic!("recv: {e}"),
                Err(_) => return false,
            }
        }
    }

    #[test]
    fn mode_encoding_round_trips() {
        for m in [
            Mode::Pass,
            Mode::Drop,
            Mode::Lossy(0),
            Mode::Lossy(250),
            Mode::Lossy(999),
        ] {
            assert_eq!(Mode::decode(m.encode()), m);
        }
    }

    #[tokio::test]
    async fn pass_drop_and_lossy() {
        let (target, echo) = echo_server().await;
        let proxy = FaultProxy::start(target).await.unwrap();
        assert_ne!(proxy.addr(), target);
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let long = Duration::from_secs(5);

        assert!(round_trip(&client, proxy.addr(), b"one", long).await);
        assert_eq!(
            proxy.stats(),
            ProxyStats {
                forwarded: 2,
                dropped: 0
            }
        );

        proxy.set(Mode::Drop);
        assert!(!round_trip(&client, proxy.addr(), b"two", Duration::from_millis(300)).await);
        assert_eq!(proxy.stats().dropped, 1, "dropped on the way in");

        proxy.set(Mode::Pass);
        assert!(round_trip(&client, proxy.addr(), b"three", long).await);

        // A second dialler gets a session of its own; the target sees two peer addresses.
        let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        assert!(round_trip(&other, proxy.addr(), b"four", long).await);
        assert!(round_trip(&client, proxy.addr(), b"five", long).await);

        // Lossy at the proxy level: datagrams go and get lost, the proxy keeps serving.
        proxy.set(Mode::Lossy(500));
        let before = proxy.stats();
        for i in 0..20u32 {
            let msg = format!("lossy-{i}");
            round_trip(
                &client,
                proxy.addr(),
                msg.as_bytes(),
                Duration::from_millis(20),
            )
            .await;
        }
        let after = proxy.stats();
        assert!(after.dropped > before.dropped, "{before:?} -> {after:?}");
        assert!(
            after.forwarded > before.forwarded,
            "{before:?} -> {after:?}"
        );
        drop(proxy);
        echo.abort();
    }

    #[test]
    fn lossy_gate_drops_its_share_reproducibly() {
        let run = |seed| {
            let gate = Gate {
                mode: ModeSwitch::new(Mode::Lossy(250)),
                rng: Mutex::new(StdRng::seed_from_u64(seed)),
                counters: Counters::default(),
            };
            (0..4000).map(|_| gate.pass()).collect::<Vec<bool>>()
        };
        let a = run(7);
        assert_eq!(a, run(7), "same seed, same pattern");
        let dropped = a.iter().filter(|ok| !**ok).count();
        assert!((850..=1150).contains(&dropped), "dropped {dropped} of 4000");
    }

    #[tokio::test]
    async fn survives_a_target_that_goes_away_and_comes_back() {
        let (target, echo) = echo_server().await;
        let proxy = FaultProxy::start(target).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        assert!(round_trip(&client, proxy.addr(), b"up", Duration::from_secs(5)).await);
        echo.abort();
        let _ = echo.await;
        // Nothing listens: the datagram is refused (ICMP), the proxy keeps going.
        assert!(!round_trip(&client, proxy.addr(), b"down", Duration::from_millis(300)).await);
        // Same port again, as a restarted node would bind.
        let s = UdpSocket::bind(target).await.unwrap();
        let back = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                let (n, from) = s.recv_from(&mut buf).await.unwrap();
                s.send_to(&buf[..n], from).await.unwrap();
            }
        });
        assert!(round_trip(&client, proxy.addr(), b"again", Duration::from_secs(5)).await);
        back.abort();
    }
}
