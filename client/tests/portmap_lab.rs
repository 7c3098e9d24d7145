//! The port mapper against a real home router: Debian's miniupnpd (UPnP IGD, NAT-PMP, PCP)
//! on a natlab router in front of a random-port symmetric NAT. The mapper runs in-process in the
//! host's namespace; the checks look at the router's rules and at real packets from outside.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use meshpunch::portmap::{PortMapper, Snapshot};
use natlab::{Nat, Topology, TopologySpec};

fn ready(test: &str) -> bool {
    natlab::testenv::require_root(test)
        && natlab::testenv::require_commands(test, &["ip", "nft", "conntrack", "miniupnpd"])
}

/// A symmetric-NAT site `pm` with miniupnpd on its router (host pm1) and an open host op1.
fn lab() -> Topology {
    TopologySpec::new()
        .site("pm", Nat::Symmetric, 1)
        .with_port_mapping()
        .site("op", Nat::Open, 1)
        .build()
        .unwrap()
}

const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);

/// A tokio runtime whose worker threads live in `host`'s namespace (threads inherit it), so
/// sockets the mapper opens in spawned tasks are the host's.
fn runtime_in(topo: &Topology, host: &str) -> tokio::runtime::Runtime {
    topo.lab
        .in_ns(host, || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap()
        })
        .unwrap()
}

fn start(rt: &tokio::runtime::Runtime, port: u16) -> PortMapper {
    rt.block_on(rt.spawn(async move {
        PortMapper::start(IpAddr::V4(GATEWAY), port, Default::default()).unwrap()
    }))
    .unwrap()
}

/// Sends from op1 to `to` and returns what `data` received (and from where), if anything.
fn from_outside(
    topo: &Topology,
    data: &UdpSocket,
    to: SocketAddr,
) -> Option<(Vec<u8>, SocketAddr)> {
    let out = topo
        .lab
        .udp_socket("op1", SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
        .unwrap();
    data.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..5 {
        out.send_to(b"from outside", to).unwrap();
        if let Ok((n, from)) = data.recv_from(&mut buf) {
            return Some((buf[..n].to_vec(), from));
        }
    }
    None
}

/// Waits until `f(snapshot)` holds (at most `max`).
fn wait(m: &PortMapper, max: Duration, f: impl Fn(&Snapshot) -> bool) -> Snapshot {
    let deadline = Instant::now() + max;
    loop {
        let s = m.snapshot();
        if f(&s) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn miniupnpd_maps_the_data_port_it_forwards_is_re_created_after_a_restart_and_deleted_on_stop() {
    let test = "miniupnpd_maps_the_data_port_it_forwards_is_re_created_after_a_restart_and_deleted_on_stop";
    if !ready(test) {
        return;
    }
    let mut topo = lab();
    let wan = topo.host("pm1").unwrap().public_ip;
    let host_ip = topo.host("pm1").unwrap().ip;
    let op = topo.host("op1").unwrap().ip;
    let data = topo
        .lab
        .udp_socket("pm1", SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
        .unwrap();
    let port = data.local_addr().unwrap().port();
    let rt = runtime_in(&topo, "pm1");
    let m = start(&rt, port);
    let s = rt.block_on(m.settled(Duration::from_secs(10)));
    println!("{s:?}");
    assert!(
        s.report.pcp && s.report.pmp && s.report.upnp,
        "miniupnpd offers all three: {s:?}"
    );
    assert_eq!(s.protocol, Some("pcp"), "PCP preferred");
    let mapped = s.report.mapped.expect("a mapping");
    assert_eq!(mapped.ip(), IpAddr::V4(wan));
    let rules = topo.port_mappings("pm").unwrap();
    assert!(rules.contains(&format!("{host_ip}:{port}")), "{rules}");
    assert!(s.ignored.is_empty(), "{s:?}");

    // The mapping forwards: a packet from outside to the mapped address reaches the data socket
    // (behind a symmetric NAT that drops every unsolicited packet otherwise).
    let got = from_outside(&topo, &data, mapped);
    assert_eq!(
        got.map(|(b, f)| (b, f.ip())),
        Some((b"from outside".to_vec(), IpAddr::V4(op)))
    );
    let unmapped = SocketAddr::new(
        IpAddr::V4(wan),
        if mapped.port() == 40000 { 40001 } else { 40000 },
    );
    assert!(
        from_outside(&topo, &data, unmapped).is_none(),
        "the NAT drops what is not mapped"
    );

    // The router restarts and forgets the mapping; the mapper notices at its next renewal (the
    // lab grants 20 s, renewal at 10 s) from the epoch and maps again.
    // (3 s after the grant: PCP's epoch check allows 2 s of clock skew, so a restart right
    // after a grant cannot be told from the epoch; the renewal re-creates the mapping anyway.)
    std::thread::sleep(Duration::from_secs(3));
    topo.restart_port_mapping("pm").unwrap();
    let gone = topo.port_mappings("pm").unwrap();
    assert!(!gone.contains(&format!("{host_ip}:{port}")), "{gone}");
    let s = wait(&m, Duration::from_secs(25), |s| {
        s.gateway_restarts >= 1 && s.report.mapped.is_some()
    });
    assert!(s.gateway_restarts >= 1, "restart noticed: {s:?}");
    let mapped = s.report.mapped.expect("re-created");
    let rules = topo.port_mappings("pm").unwrap();
    assert!(rules.contains(&format!("{host_ip}:{port}")), "{rules}");
    assert!(
        from_outside(&topo, &data, mapped).is_some(),
        "forwards again after the restart"
    );

    // Clean exit deletes it on the router.
    rt.block_on(m.stop());
    let rules = topo.port_mappings("pm").unwrap();
    assert!(
        !rules.contains(&format!("{host_ip}:{port}")),
        "deleted on stop: {rules}"
    );
    assert!(
        from_outside(&topo, &data, mapped).is_none(),
        "no longer forwarded"
    );
}

#[test]
fn upnp_alone_maps_forwards_and_deletes_on_stop() {
    let test = "upnp_alone_maps_forwards_and_deletes_on_stop";
    if !ready(test) {
        return;
    }
    let topo = lab();
    // The router drops PCP / NAT-PMP from the LAN: only UPnP IGD is left.
    topo.lab
        .nft(
            "pm",
            "table inet nopmp {\n chain in { type filter hook input priority -10; policy accept;\n  udp dport 5351 drop\n }\n}\n",
        )
        .unwrap();
    let host_ip = topo.host("pm1").unwrap().ip;
    let data = topo
        .lab
        .udp_socket("pm1", SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
        .unwrap();
    let port = data.local_addr().unwrap().port();
    let rt = runtime_in(&topo, "pm1");
    let m = start(&rt, port);
    let s = wait(&m, Duration::from_secs(15), |s| s.report.mapped.is_some());
    println!("{s:?}");
    assert!(!s.report.pcp && !s.report.pmp && s.report.upnp, "{s:?}");
    assert_eq!(s.protocol, Some("upnp"));
    let mapped = s.report.mapped.expect("a UPnP mapping");
    assert!(topo
        .port_mappings("pm")
        .unwrap()
        .contains(&format!("{host_ip}:{port}")));
    assert!(
        from_outside(&topo, &data, mapped).is_some(),
        "the UPnP mapping forwards"
    );
    rt.block_on(m.stop());
    let rules = topo.port_mappings("pm").unwrap();
    assert!(
        !rules.contains(&format!("{host_ip}:{port}")),
        "DeletePortMapping on stop: {rules}"
    );
}
