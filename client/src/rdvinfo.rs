//! What `netcheck --connect` learns from the rendezvous: the STUN servers and the relay map.
//! It registers with a throw-away key (the network token is what authorises it), reads the
//! registration and disconnects.

use std::net::SocketAddr;
use std::time::Duration;

use meshpunch_proto::connect::ConnectString;

use crate::daemon::turn_uri_authority;
use crate::rendezvous::{Client, ClientConfig, Event};

/// Relay regions as netcheck tests them: (region, TURN URI, resolved address).
pub type RelayTargets = Vec<(String, String, Option<SocketAddr>)>;

/// Connects, registers with an ephemeral key and returns (STUN servers, relays). When the
/// rendezvous cannot be reached (down, certificate refused) but the connect string names a
/// `stun=` server, that one is returned with a warning so netcheck still runs; `ca_roots`
/// are extra CAs for a connect string without pin.
pub async fn fetch(
    connect: &str,
    ca_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
) -> anyhow::Result<(Vec<SocketAddr>, RelayTargets)> {
    let cs: ConnectString = connect
        .parse()
        .map_err(|e| anyhow::anyhow!("connect string: {e}"))?;
    let mut stun = Vec::new();
    if let Some(s) = &cs.stun {
        if let Ok(mut it) = tokio::net::lookup_host(s.as_str()).await {
            if let Some(a) = it.next() {
                stun.push(a);
            }
        }
    }
    let secret = x25519_dalek::StaticSecret::from(crate::keys::generate_private());
    let mut cfg = ClientConfig::new(cs, secret);
    cfg.ca_roots = ca_roots;
    let connected = tokio::time::timeout(Duration::from_secs(10), Client::connect(cfg))
        .await
        .map_err(|_| anyhow::anyhow!("rendezvous did not answer within 10 s"))
        .and_then(|r| r.map_err(|e| anyhow::anyhow!("rendezvous: {e}")));
    let (client, mut events) = match connected {
        Ok(x) => x,
        Err(e) if !stun.is_empty() => {
            tracing::warn!(error = %e, "rendezvous unreachable; testing with the connect string's stun= server only (no relay map)");
            return Ok((stun, Vec::new()));
        }
        Err(e) => return Err(e),
    };
    let reg = match client.registration() {
        Some(r) => r,
        // The registration may reach the event stream just after connect() returns.
        None => tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(ev) = events.recv().await {
                if let Event::Registered(r) = ev {
                    return Some(r);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| anyhow::anyhow!("rendezvous: no registration"))?,
    };
    for s in reg.stun {
        if !stun.contains(&s) {
            stun.push(s);
        }
    }
    let mut relays = Vec::new();
    for r in reg.relays {
        let url = meshpunch_proto::node::relay::usable_url(&r.urls)
            .cloned()
            .unwrap_or_default();
        let addr = match turn_uri_authority(&url) {
            Some(a) => tokio::net::lookup_host(a)
                .await
                .ok()
                .and_then(|mut it| it.find(|a| a.is_ipv4())),
            None => None,
        };
        relays.push((r.region, url, addr));
    }
    client.close();
    Ok((stun, relays))
}
