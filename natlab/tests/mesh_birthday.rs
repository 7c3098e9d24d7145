//! Birthday punching end to end: a1 behind a random-port symmetric NAT (`masquerade
//! random,fully-random`), b1 behind a port-restricted cone NAT (endpoint-independent mapping,
//! address-and-port-dependent filtering), the servers 25 ms away each way. With one socket per
//! side nothing can meet; a1 pings b1 from a pool of 256 sockets while b1 sprays pings to
//! random ports of a1's public IP until one lands on a pool socket's port. The test then sends
//! WireGuard-framed traffic both ways through the path (a1's fast path sends from the pool
//! socket, b1 answers to its port) and checks that the unused pool sockets are closed again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use natlab::mesh::{FakeWg, Mesh, UpOptions};
use natlab::{Nat, TopologySpec};

const PROXY_PORT: u16 = 51900;

fn peer_entry(st: &serde_json::Value, key: &str) -> serde_json::Value {
    st.get("peers")
        .and_then(|p| p.as_array())
        .and_then(|ps| {
            ps.iter()
                .find(|p| p.get("public_key").and_then(|k| k.as_str()) == Some(key))
                .cloned()
        })
        .unwrap_or(serde_json::Value::Null)
}

fn num(v: &serde_json::Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(v, |v, k| v.get(*k))
        .and_then(|x| x.as_u64())
        .unwrap_or(0)
}

#[test]
fn symmetric_nat_and_port_restricted_nat_carry_traffic_on_a_birthday_path() {
    let test = "symmetric_nat_and_port_restricted_nat_carry_traffic_on_a_birthday_path";
    if support::mesh_ready(test, &[]).is_none() {
        return;
    }
    let spec = TopologySpec::new()
        .site("a", Nat::Symmetric, 1)
        .site("b", Nat::PortRestricted, 1);
    birthday_path(spec);
}

/// Issue 17: b1's router ACCEPTS unsolicited UDP (no `ct state new drop`), so every pool ping
/// that reached it would make a conntrack entry there and b1's spray to that port would
/// leave from another source port. Half of a1's pool pings carry TTL 2 (they pass a1's router
/// and die at the next hop), so those ports stay free on b1's router and the spray hits them.
#[test]
fn birthday_path_behind_a_router_that_accepts_unsolicited_udp() {
    let test = "birthday_path_behind_a_router_that_accepts_unsolicited_udp";
    if support::mesh_ready(test, &[]).is_none() {
        return;
    }
    let spec = TopologySpec::new()
        .site("a", Nat::Symmetric, 1)
        .site("b", Nat::PortRestricted, 1)
        .accepting();
    birthday_path(spec);
}

/// Both routers accept unsolicited UDP: the spray makes entries on a1's router too, but only
/// for ports no pool socket holds (the pool pings went first), so the pool's mappings stay.
#[test]
fn birthday_path_when_both_routers_accept_unsolicited_udp() {
    let test = "birthday_path_when_both_routers_accept_unsolicited_udp";
    if support::mesh_ready(test, &[]).is_none() {
        return;
    }
    let spec = TopologySpec::new()
        .site("a", Nat::Symmetric, 1)
        .accepting()
        .site("b", Nat::PortRestricted, 1)
        .accepting();
    birthday_path(spec);
}

/// a1 (symmetric) and b1 (port-restricted) in `spec`, servers 25 ms away: direct by birthday
/// probing, WireGuard-framed traffic both ways, the pool closed down to the path's socket.
fn birthday_path(spec: TopologySpec) {
    let delay = Duration::from_millis(25);
    let topo = spec.server_delay(delay).build().unwrap();
    let mut mesh = Mesh::start_with(topo, support::relay_impl()).unwrap();

    // a1: a fake WireGuard that measures round trips; b1: one that echoes.
    let pinger = FakeWg::bind(&mesh.topo, "a1", 0).unwrap();
    let echo = FakeWg::bind(&mesh.topo, "b1", 0)
        .unwrap()
        .spawn_echo()
        .unwrap();
    let echo_addr = echo.addr();
    // MESHPUNCH_TEST_BIRTHDAY_TTL_OFF=1 sends every pool ping with the system's TTL (as
    // before issue 17): the accepting-router tests then end on the relay, which shows what
    // they test.
    let ttl_off = std::env::var("MESHPUNCH_TEST_BIRTHDAY_TTL_OFF").is_ok();
    let extra: Vec<String> = if ttl_off {
        vec!["BirthdayTtl = 0".into()]
    } else {
        Vec::new()
    };
    let oa = UpOptions {
        peers: vec!["b1".into()],
        interface_extra: extra,
        wireguard_endpoint: Some(pinger.addr().unwrap()),
        proxy_ports: BTreeMap::from([("b1".to_string(), PROXY_PORT)]),
        ..Default::default()
    };
    let ob = UpOptions {
        peers: vec!["a1".into()],
        wireguard_endpoint: Some(echo_addr),
        ..Default::default()
    };
    mesh.up("a1", &oa).unwrap();
    mesh.up("b1", &ob).unwrap();

    let (va, took_a) = match mesh.wait_path("a1", "b1", &["direct"], Duration::from_secs(30)) {
        Ok(v) => v,
        Err(e) => {
            // What went wrong: both sides' birthday counters, and the routers' UDP conntrack
            // entries (a collision shows as the spray leaving b's router from another port).
            for h in ["a1", "b1"] {
                let st = mesh.status(h).unwrap_or_default();
                eprintln!("{h} birthday: {}", st["birthday"]);
            }
            for r in ["a", "b"] {
                let out = mesh
                    .topo
                    .lab
                    .exec_any(r, "conntrack", &["-L", "-p", "udp"])
                    .unwrap_or_default()
                    .1;
                let sample: Vec<&str> = out.lines().take(20).collect();
                eprintln!(
                    "router {r}: {} UDP conntrack entries, first 20:\n{}",
                    out.lines().count(),
                    sample.join("\n")
                );
            }
            panic!("{e}");
        }
    };
    let (vb, took_b) = mesh
        .wait_path("b1", "a1", &["direct"], Duration::from_secs(30))
        .unwrap();
    println!(
        "a1 (symmetric) -> b1: direct via {:?} after {} ({})",
        va.remote,
        support::secs(took_a),
        va.reason
    );
    println!(
        "b1 (port-restricted) -> a1: direct via {:?} after {} ({})",
        vb.remote,
        support::secs(took_b),
        vb.reason
    );
    let key_a = mesh.node("a1").unwrap().public_key;
    let key_b = mesh.node("b1").unwrap().public_key;
    let sa = mesh.status("a1").unwrap();
    let sb = mesh.status("b1").unwrap();
    let pa = peer_entry(&sa, &key_b);
    let pb = peer_entry(&sb, &key_a);
    println!(
        "a1: mapping {}, path from pool socket {} (port {}), {} low-TTL pool pings; b1: mapping {}, spray {} sent / {} answered, {} found",
        sa["birthday"]["mapping"],
        num(&pa, &["local_socket"]),
        num(&pa, &["local_port"]),
        num(&pa, &["birthday", "low_ttl_pings"]),
        sb["birthday"]["mapping"],
        num(&pb, &["birthday", "spray_sent"]),
        num(&pb, &["birthday", "spray_hits"]),
        num(&pb, &["birthday", "found"]),
    );
    assert_eq!(sa["birthday"]["mapping"], "endpoint-dependent", "{sa}");
    assert_eq!(sb["birthday"]["mapping"], "endpoint-independent", "{sb}");
    assert_eq!(pa["birthday"]["role"], "hard", "{pa}");
    assert_eq!(pb["birthday"]["role"], "easy", "{pb}");
    assert!(num(&pb, &["birthday", "spray_sent"]) <= 2048, "{pb}");
    assert!(num(&pa, &["birthday", "low_ttl_pings"]) > 0, "{pa}");
    // Almost always a pool socket carries a1's side. Rarely (about 1 in 257) the port that
    // answers is the data socket's own mapping towards b1 — also a birthday hit, without the
    // pool; and a pool socket's random port may equal the one the STUN server saw, so b1's
    // plain server-reflexive ping opens the path before any spray. Both are direct paths.
    let pooled = num(&pa, &["local_socket"]) != 0;
    if pooled {
        assert_ne!(num(&pa, &["local_port"]), 0, "{pa}");
    } else {
        println!("(this run's hit was the data socket's own mapping: no pool socket used)");
    }

    // Traffic both ways through the birthday path: a1's proxy -> pool socket -> b1's data
    // socket -> echo -> b1's data socket -> a1's pool socket -> a1's proxy.
    let count = 20;
    let proxy = va
        .proxy
        .unwrap_or_else(|| ([127, 0, 0, 1], PROXY_PORT).into());
    let rtt = pinger
        .rtt(
            proxy,
            count,
            Duration::from_millis(50),
            Duration::from_secs(2),
        )
        .unwrap();
    println!("RTT a1 -> b1 on the birthday path: {rtt}");
    drop(echo);
    assert!(rtt.received >= count - 1, "{rtt}");
    // Not relayed: through the relay a round trip crosses the 25 ms server link four times.
    assert!(
        rtt.avg_ms < 2.0 * delay.as_secs_f64() * 1e3,
        "{rtt} looks relayed"
    );
    // Both still on the birthday path, the pool down to the socket(s) carrying it.
    std::thread::sleep(Duration::from_secs(2));
    let sa = mesh.status("a1").unwrap();
    let pa = peer_entry(&sa, &key_b);
    assert_eq!(pa["path"], "direct", "{pa}");
    assert_eq!(num(&pa, &["local_socket"]) != 0, pooled, "{pa}");
    assert!(num(&pa, &["tx_packets"]) >= u64::from(count), "{pa}");
    assert!(num(&pa, &["rx_packets"]) >= u64::from(count - 1), "{pa}");
    let open = num(&sa, &["birthday", "pool_open"]);
    println!(
        "a1 pool: {open} open of {} opened",
        num(&sa, &["birthday", "pool_opened_total"])
    );
    assert!(open <= 4 && (open >= 1 || !pooled), "{}", sa["birthday"]);
}
