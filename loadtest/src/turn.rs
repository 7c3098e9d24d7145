//! TURN setup for the load: one allocation per client with REST-API credentials, a channel
//! bound to each of that client's peers, driven through the sans-IO
//! [`meshpunch_proto::turn_client::TurnClient`] over a blocking socket.
//!
//! Works against any RFC 8656 server (coturn's `turnserver --use-auth-secret` included):
//! Allocate (401 → REALM/NONCE → retry), ChannelBind (which installs the permission).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use meshpunch_proto::creds::rest_credentials;
use meshpunch_proto::turn_client::{TurnClient, TurnCredentials, TurnEvent};

use std::sync::{Arc, Mutex};

use crate::engine::{Flow, Framing, Link};
use crate::load::LoadError;
use crate::stream::{StreamConn, Transport};
use crate::udp;

/// How long one client's Allocate + ChannelBind may take.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Lifetime of the REST credentials the load mints.
pub const CREDENTIAL_LIFETIME: Duration = Duration::from_secs(3600);

/// Clients set up in parallel (one thread each handles its share sequentially).
const SETUP_THREADS: usize = 8;

/// A live allocation kept so it can be released after the run.
pub struct Allocation {
    client: TurnClient,
    /// UDP allocations: the client's socket (released with a zero-lifetime Refresh). Stream
    /// allocations end with their connection (RFC 8656 §3.1), dropped with the flows.
    sock: Option<UdpSocket>,
    relayed: SocketAddr,
}

impl Allocation {
    /// The relayed transport address peers send to.
    pub fn relayed(&self) -> SocketAddr {
        self.relayed
    }
}

fn drive(
    client: &mut TurnClient,
    sock: &UdpSocket,
    buf: &mut [u8],
    until: impl Fn(&TurnEvent) -> Option<Result<(), String>>,
) -> Result<(), String> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        while let Some(t) = client.poll_transmit() {
            sock.send_to(&t.payload, t.dst).map_err(|e| e.to_string())?;
        }
        while let Some(ev) = client.poll_event() {
            if let Some(done) = until(&ev) {
                return done;
            }
            if let TurnEvent::Failed { op, code, reason } = &ev {
                return Err(format!("{op:?} failed: {code:?} {reason}"));
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err("timed out".into());
        }
        let wait = client
            .poll_timeout()
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(200))
            .clamp(Duration::from_millis(1), Duration::from_millis(200));
        match udp::recv_timeout(sock, buf, wait) {
            Ok(Some((n, from))) => {
                let _ = client.handle_input(Instant::now(), from, &buf[..n]);
            }
            Ok(None) => client.handle_timeout(Instant::now()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err("server not listening (ICMP port unreachable)".into())
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn new_client(server: SocketAddr, secret: &str, user: &str) -> TurnClient {
    let expires =
        meshpunch_proto::clock::unix_secs(SystemTime::now()) + CREDENTIAL_LIFETIME.as_secs();
    let creds = rest_credentials(secret.as_bytes(), expires, user);
    TurnClient::new(
        server,
        TurnCredentials {
            username: creds.username,
            password: creds.password,
        },
        Instant::now(),
    )
}

/// One client's allocation and channels over a TCP or TLS connection (see [`crate::stream`]).
fn allocate_one_stream(
    server: SocketAddr,
    secret: &str,
    client_ip: IpAddr,
    transport: &Transport,
    peers: &[(usize, SocketAddr)],
    user: &str,
) -> Result<(Vec<Flow>, Allocation), String> {
    let mut conn = StreamConn::connect(server, client_ip, transport, SETUP_TIMEOUT)
        .map_err(|e| format!("{} connect: {e}", transport.name()))?;
    let mut client = new_client(server, secret, user);
    client.allocate(Instant::now());
    conn.drive(&mut client, server, SETUP_TIMEOUT, |ev| match ev {
        TurnEvent::Allocated { .. } => Some(Ok(())),
        _ => None,
    })?;
    let relayed = client
        .relayed_addr()
        .ok_or_else(|| "no relayed address after Allocate".to_string())?;
    let mut channels = Vec::with_capacity(peers.len());
    for &(index, peer) in peers {
        client
            .bind_channel(peer, Instant::now())
            .map_err(|e| format!("ChannelBind: {e}"))?;
        conn.drive(&mut client, server, SETUP_TIMEOUT, |ev| match ev {
            TurnEvent::ChannelBound { peer: p, .. } if *p == peer => Some(Ok(())),
            _ => None,
        })?;
        let channel = client
            .channel_for(peer)
            .ok_or_else(|| "no channel after ChannelBind".to_string())?;
        channels.push((index, channel));
    }
    conn.start_load().map_err(|e| e.to_string())?;
    let conn = Arc::new(Mutex::new(conn));
    let flows = channels
        .into_iter()
        .map(|(peer, channel)| Flow {
            link: Link::Stream(conn.clone()),
            framing: Framing::ChannelData(channel),
            peer,
            back: None,
        })
        .collect();
    Ok((
        flows,
        Allocation {
            client,
            sock: None,
            relayed,
        },
    ))
}

fn allocate_one(
    server: SocketAddr,
    secret: &str,
    client_ip: IpAddr,
    peers: &[(usize, SocketAddr)],
    user: &str,
) -> Result<(Vec<Flow>, Allocation), String> {
    let sock = udp::bind(SocketAddr::new(client_ip, 0)).map_err(|e| e.to_string())?;
    let now = Instant::now();
    let mut client = new_client(server, secret, user);
    let mut buf = vec![0u8; 2048];
    client.allocate(now);
    drive(&mut client, &sock, &mut buf, |ev| match ev {
        TurnEvent::Allocated { .. } => Some(Ok(())),
        _ => None,
    })?;
    let relayed = client
        .relayed_addr()
        .ok_or_else(|| "no relayed address after Allocate".to_string())?;
    let data = sock.try_clone().map_err(|e| e.to_string())?;
    data.connect(server).map_err(|e| e.to_string())?;
    let mut flows = Vec::with_capacity(peers.len());
    for &(index, peer) in peers {
        client
            .bind_channel(peer, Instant::now())
            .map_err(|e| format!("ChannelBind: {e}"))?;
        drive(&mut client, &sock, &mut buf, |ev| match ev {
            TurnEvent::ChannelBound { peer: p, .. } if *p == peer => Some(Ok(())),
            _ => None,
        })?;
        let channel = client
            .channel_for(peer)
            .ok_or_else(|| "no channel after ChannelBind".to_string())?;
        flows.push(Flow {
            link: Link::Udp(data.try_clone().map_err(|e| e.to_string())?),
            framing: Framing::ChannelData(channel),
            peer: index,
            back: None,
        });
    }
    Ok((
        flows,
        Allocation {
            client,
            sock: Some(sock),
            relayed,
        },
    ))
}

/// Allocates one relay per entry of `peers` (one client each) on `server`, reached over
/// `transport`, and binds a channel to each of that client's peers (peer index, address).
/// Returns the flows in order (client by client, channel by channel) and the allocations.
pub fn allocate_all(
    server: SocketAddr,
    secret: &str,
    client_ip: IpAddr,
    transport: &Transport,
    peers: &[Vec<(usize, SocketAddr)>],
) -> Result<(Vec<Flow>, Vec<Allocation>), LoadError> {
    let run_id: u32 = rand::random();
    let threads = SETUP_THREADS.min(peers.len()).max(1);
    let chunk = peers.len().div_ceil(threads);
    type Part = Vec<(Vec<Flow>, Allocation)>;
    let results: Vec<Result<Part, LoadError>> = thread::scope(|s| {
        let handles: Vec<_> = peers
            .chunks(chunk.max(1))
            .enumerate()
            .map(|(c, part)| {
                s.spawn(move || {
                    let mut out = Vec::with_capacity(part.len());
                    for (j, client_peers) in part.iter().enumerate() {
                        let i = c * chunk + j;
                        let user = format!("load-{run_id:08x}-{i}");
                        let one = match transport {
                            Transport::Udp => {
                                allocate_one(server, secret, client_ip, client_peers, &user)
                            }
                            _ => allocate_one_stream(
                                server,
                                secret,
                                client_ip,
                                transport,
                                client_peers,
                                &user,
                            ),
                        }
                        .map_err(|reason| LoadError::Setup { client: i, reason })?;
                        out.push(one);
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(LoadError::Setup {
                        client: 0,
                        reason: "setup thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut flows = Vec::with_capacity(peers.len());
    let mut allocs = Vec::with_capacity(peers.len());
    for r in results {
        for (f, a) in r? {
            flows.extend(f);
            allocs.push(a);
        }
    }
    Ok((flows, allocs))
}

/// Releases allocations (Refresh with LIFETIME 0): sends every release, then reads answers
/// for a short while so they do not linger as ICMP noise.
pub fn release_all(allocs: Vec<Allocation>) {
    let mut buf = vec![0u8; 2048];
    let mut allocs = allocs;
    for a in allocs.iter_mut() {
        let Some(sock) = &a.sock else { continue };
        a.client.release(Instant::now());
        while let Some(t) = a.client.poll_transmit() {
            let _ = sock.send_to(&t.payload, t.dst);
        }
    }
    let deadline = Instant::now() + Duration::from_millis(300);
    for a in allocs.iter_mut() {
        if Instant::now() >= deadline {
            break;
        }
        let Some(sock) = &a.sock else { continue };
        if let Ok(Some((n, from))) = udp::recv_timeout(sock, &mut buf, Duration::from_millis(20)) {
            let _ = a.client.handle_input(Instant::now(), from, &buf[..n]);
        }
    }
}
