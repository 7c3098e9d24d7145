//! The rendezvous connection rides the data socket, behind real NATs. a1 sits behind a
//! port-restricted cone NAT, b1 behind a full-cone NAT (both endpoint-independent mapping, so
//! one socket has one public mapping whatever the destination). Each daemon's QUIC connection
//! to the rendezvous must share its data socket: the address the rendezvous observes equals
//! the data socket's STUN mapping (same public IP and port), the daemon's only UDP sockets are
//! the data socket and its proxy port, and the direct path between them still carries traffic.
//! (Behind a symmetric NAT the two addresses differ legitimately: each destination gets its
//! own mapping.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use natlab::mesh::{FakeWg, Mesh, UpOptions, DATA_PORT};
use natlab::{Nat, TopologySpec};

const PROXY_PORT: u16 = 51900;

fn addr(v: &serde_json::Value) -> Option<SocketAddr> {
    v.as_str().and_then(|s| s.parse().ok())
}

/// IPv4-mapped addresses (the dual-stack data socket) as IPv4.
fn v4(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::from((ip, v6.port())),
            None => a,
        },
        a => a,
    }
}

/// Local ports of the UDP sockets of the `meshpunch` process in `host`.
fn daemon_udp_ports(mesh: &Mesh, host: &str) -> Vec<u16> {
    let out = mesh.topo.lab.exec(host, "ss", &["-uanp"]).unwrap();
    let mut ports: Vec<u16> = out
        .lines()
        .filter(|l| l.contains("((\"meshpunch\""))
        .filter_map(|l| {
            let local = l.split_whitespace().nth(3)?;
            local.rsplit(':').next()?.parse().ok()
        })
        .collect();
    ports.sort_unstable();
    ports
}

#[test]
fn rendezvous_observes_the_data_sockets_stun_mapping_behind_cone_nats() {
    let test = "rendezvous_observes_the_data_sockets_stun_mapping_behind_cone_nats";
    if support::mesh_ready(test, &[]).is_none() {
        return;
    }
    let topo = TopologySpec::new()
        .site("a", Nat::PortRestricted, 1)
        .site("b", Nat::FullCone, 1)
        .server_delay(Duration::from_millis(10))
        .build()
        .unwrap();
    let public: BTreeMap<&str, _> = ["a1", "b1"]
        .into_iter()
        .map(|h| (h, topo.host(h).unwrap().public_ip))
        .collect();
    let mut mesh = Mesh::start_with(topo, support::relay_impl()).unwrap();

    let pinger = FakeWg::bind(&mesh.topo, "a1", 0).unwrap();
    let echo = FakeWg::bind(&mesh.topo, "b1", 0)
        .unwrap()
        .spawn_echo()
        .unwrap();
    let echo_addr = echo.addr();
    // The binding-lifetime measurement and the port mapper (PCP/NAT-PMP to the gateway's 5351,
    // SSDP for UPnP) run on sockets of their own (by design never the data socket); off here
    // so the socket count below is about the data path alone.
    let own_sockets_off = vec![
        "BindingLifetimeProbe = off".to_string(),
        "PortMapping = off".to_string(),
    ];
    let oa = UpOptions {
        peers: vec!["b1".into()],
        wireguard_endpoint: Some(pinger.addr().unwrap()),
        proxy_ports: BTreeMap::from([("b1".to_string(), PROXY_PORT)]),
        interface_extra: own_sockets_off.clone(),
        ..Default::default()
    };
    let ob = UpOptions {
        peers: vec!["a1".into()],
        wireguard_endpoint: Some(echo_addr),
        proxy_ports: BTreeMap::from([("a1".to_string(), PROXY_PORT)]),
        interface_extra: own_sockets_off.clone(),
        ..Default::default()
    };
    mesh.up("a1", &oa).unwrap();
    mesh.up("b1", &ob).unwrap();

    for host in ["a1", "b1"] {
        // Registered, and STUN from the data socket answered (not just the rendezvous'
        // observed address standing in for it).
        let deadline = Instant::now() + Duration::from_secs(30);
        let st = loop {
            let st = mesh.status(host).unwrap();
            if st["rendezvous"]["state"] == "connected" && st["public_addr_source"] == "stun" {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "{host}: no registration + STUN mapping in 30 s: {st:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let rdv = &st["rendezvous"];
        let observed = addr(&rdv["observed_addr"]).map(v4);
        let stun = addr(&st["public_addr"]).map(v4);
        let quic_local = addr(&rdv["quic_local_addr"]);
        let ports = daemon_udp_ports(&mesh, host);
        println!(
            "{host}: data socket {} STUN mapping {stun:?}, rendezvous observed {observed:?}, QUIC local {quic_local:?}, shares the data socket: {}; daemon UDP ports {ports:?}",
            st["data_addr"], rdv["shares_data_socket"]
        );
        assert_eq!(rdv["shares_data_socket"], true, "{host}: {st:#}");
        assert_eq!(quic_local.map(|a| a.port()), Some(DATA_PORT), "{host}");
        let stun = stun.expect("STUN mapping");
        assert_eq!(
            stun.ip(),
            public[host],
            "{host}: mapping not on the NAT's address"
        );
        assert_eq!(
            observed,
            Some(stun),
            "{host}: rendezvous observed != STUN mapping"
        );
        assert_eq!(
            ports,
            vec![DATA_PORT, PROXY_PORT],
            "{host}: UDP sockets besides the data socket and the proxy port"
        );
    }

    // Punching on the shared socket still works: a direct path, and traffic through it.
    let (view, took) = mesh
        .wait_path("a1", "b1", &["direct"], Duration::from_secs(30))
        .unwrap();
    println!(
        "a1 -> b1: {} via {:?} after {}",
        view.path,
        view.remote,
        support::secs(took)
    );
    let b1_stun = addr(&mesh.status("b1").unwrap()["public_addr"]).map(v4);
    assert_eq!(
        view.remote.as_deref().and_then(|r| r.parse().ok()),
        b1_stun,
        "a1 reaches b1 at its data socket's mapping"
    );
    mesh.wait_path("b1", "a1", &["direct"], Duration::from_secs(30))
        .unwrap();
    let proxy = view
        .proxy
        .unwrap_or_else(|| ([127, 0, 0, 1], PROXY_PORT).into());
    let rtt = pinger
        .rtt(proxy, 20, Duration::from_millis(50), Duration::from_secs(2))
        .unwrap();
    println!("a1 -> b1 through the proxy: {rtt}");
    // The rendezvous connection kept running on the shared socket all along.
    for host in ["a1", "b1"] {
        let st = mesh.status(host).unwrap();
        println!(
            "{host}: QUIC datagrams through the engine {}, dropped {}",
            st["rendezvous"]["quic_rx"], st["rendezvous"]["quic_rx_dropped"]
        );
        assert_eq!(st["rendezvous"]["state"], "connected");
        assert_eq!(st["rendezvous"]["quic_rx_dropped"], 0);
    }
    drop(echo);
    assert!(rtt.received >= 19, "{rtt}");
}
