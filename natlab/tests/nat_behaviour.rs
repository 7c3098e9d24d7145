//! The lab itself, proven without meshpunch: every NAT behaves as DESIGN.md's table says,
//! the shaper adds delay and loss, cuts cut and restores restore, and labs are removed.
//!
//! Needs root, `ip`, `nft` and `ping`; skips with a printed reason otherwise (fails in CI).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use natlab::probe::{observe, Reflector};
use natlab::topo::{SERVER_ALTERNATE, SERVER_PRIMARY};
use natlab::{Nat, Topology, TopologySpec};

const WAIT: Duration = Duration::from_millis(1500);

fn ready(test: &str) -> bool {
    natlab::testenv::require_root(test)
        && natlab::testenv::require_commands(test, &["ip", "nft", "ping"])
}

/// Reflector on the server: 0 = primary:3478, 1 = alternate:3478, 2 = primary:3479.
fn server_reflector(t: &Topology) -> Reflector {
    let socks = [
        SocketAddr::from((SERVER_PRIMARY, 3478)),
        SocketAddr::from((SERVER_ALTERNATE, 3478)),
        SocketAddr::from((SERVER_PRIMARY, 3479)),
    ]
    .into_iter()
    .map(|a| t.lab.udp_socket(&t.server, a).unwrap())
    .collect();
    Reflector::start(socks).unwrap()
}

fn host_socket(t: &Topology, host: &str) -> UdpSocket {
    t.lab
        .udp_socket(host, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
        .unwrap()
}

struct Behaviour {
    mapped_primary: SocketAddr,
    mapped_alternate: SocketAddr,
    /// An answer from the other address (same port) reached the host.
    from_other_ip: bool,
    /// An answer from the same address, other port, reached the host.
    from_other_port: bool,
}

fn behaviour(t: &Topology, host: &str) -> Behaviour {
    let r = server_reflector(t);
    let (p, a) = (r.addrs()[0], r.addrs()[1]);
    let s = host_socket(t, host);
    let mapped_primary = observe(&s, p, 0, WAIT)
        .unwrap()
        .expect("no answer from the primary address");
    let mapped_alternate = observe(&s, a, 1, WAIT)
        .unwrap()
        .expect("no answer from the alternate address");
    // Filtering, each from a fresh socket that has only talked to primary:3478.
    let from_other_ip = observe(&host_socket(t, host), p, 1, WAIT)
        .unwrap()
        .is_some();
    let from_other_port = observe(&host_socket(t, host), p, 2, WAIT)
        .unwrap()
        .is_some();
    Behaviour {
        mapped_primary,
        mapped_alternate,
        from_other_ip,
        from_other_port,
    }
}

fn one_site(nat: Nat) -> Topology {
    TopologySpec::new().site("x", nat, 1).build().unwrap()
}

#[test]
fn port_restricted_nat_keeps_one_mapping_and_filters_by_address_and_port() {
    if !ready("port_restricted_nat_keeps_one_mapping_and_filters_by_address_and_port") {
        return;
    }
    let t = one_site(Nat::PortRestricted);
    let b = behaviour(&t, "x1");
    let public = t.host("x1").unwrap().public_ip;
    assert_eq!(b.mapped_primary.ip(), public);
    assert_eq!(
        b.mapped_primary, b.mapped_alternate,
        "endpoint-independent mapping"
    );
    assert!(!b.from_other_ip, "address-dependent filtering");
    assert!(!b.from_other_port, "port-dependent filtering");
}

#[test]
fn symmetric_nat_maps_each_destination_to_a_new_port() {
    if !ready("symmetric_nat_maps_each_destination_to_a_new_port") {
        return;
    }
    let t = one_site(Nat::Symmetric);
    let b = behaviour(&t, "x1");
    assert_eq!(b.mapped_primary.ip(), b.mapped_alternate.ip());
    assert_ne!(
        b.mapped_primary.port(),
        b.mapped_alternate.port(),
        "address-and-port-dependent mapping"
    );
    assert!(!b.from_other_ip && !b.from_other_port);
}

#[test]
fn full_cone_nat_accepts_from_any_source() {
    if !ready("full_cone_nat_accepts_from_any_source") {
        return;
    }
    let t = one_site(Nat::FullCone);
    let b = behaviour(&t, "x1");
    assert_eq!(b.mapped_primary, b.mapped_alternate);
    assert!(
        b.from_other_ip,
        "endpoint-independent filtering (other address)"
    );
    assert!(
        b.from_other_port,
        "endpoint-independent filtering (other port)"
    );
}

#[test]
fn double_nat_maps_through_the_carrier_address() {
    if !ready("double_nat_maps_through_the_carrier_address") {
        return;
    }
    let t = one_site(Nat::DoubleNat);
    let b = behaviour(&t, "x1");
    let h = t.host("x1").unwrap();
    assert_eq!(b.mapped_primary.ip(), h.public_ip);
    assert!(h.public_ip.to_string().starts_with("198.51.100."));
    assert_eq!(b.mapped_primary, b.mapped_alternate);
    assert!(!b.from_other_ip && !b.from_other_port);
    // The home router's WAN really is in carrier space.
    let wan = t.lab.ip("x", &["-4", "addr", "show", "wan"]).unwrap();
    assert!(wan.contains("100.64."), "{wan}");
}

#[test]
fn open_host_is_seen_at_its_own_address_from_anywhere() {
    if !ready("open_host_is_seen_at_its_own_address_from_anywhere") {
        return;
    }
    let t = one_site(Nat::Open);
    let b = behaviour(&t, "x1");
    assert_eq!(
        b.mapped_primary.ip(),
        std::net::IpAddr::V4(t.host("x1").unwrap().ip)
    );
    assert_eq!(b.mapped_primary, b.mapped_alternate);
    assert!(b.from_other_ip && b.from_other_port);
}

#[test]
fn udp_blocked_site_reaches_only_the_servers() {
    if !ready("udp_blocked_site_reaches_only_the_servers") {
        return;
    }
    let t = TopologySpec::new()
        .site("x", Nat::UdpBlocked, 1)
        .site("o", Nat::Open, 1)
        .build()
        .unwrap();
    let r = server_reflector(&t);
    let s = host_socket(&t, "x1");
    assert!(
        observe(&s, r.addrs()[0], 0, WAIT).unwrap().is_some(),
        "servers must stay reachable"
    );
    let open_ip = t.host("o1").unwrap().ip;
    let peer = Reflector::start(vec![t
        .lab
        .udp_socket("o1", SocketAddr::from((open_ip, 4000)))
        .unwrap()])
    .unwrap();
    assert!(
        observe(&s, peer.addrs()[0], 0, WAIT).unwrap().is_none(),
        "UDP to a non-server must be dropped"
    );
    // The open host itself reaches the peer (so the drop is the site's doing).
    let so = host_socket(&t, "o1");
    assert!(observe(&so, peer.addrs()[0], 0, WAIT).unwrap().is_some());
}

/// `udp-blocked-all`: no UDP at all (servers included), TCP only to the servers' 443 and 80.
#[test]
fn udp_blocked_all_site_allows_only_tcp_443_and_80_to_the_servers() {
    if !ready("udp_blocked_all_site_allows_only_tcp_443_and_80_to_the_servers") {
        return;
    }
    let t = TopologySpec::new()
        .site("x", Nat::UdpBlockedAll, 1)
        .site("o", Nat::Open, 1)
        .build()
        .unwrap();
    let r = server_reflector(&t);
    let s = host_socket(&t, "x1");
    assert!(
        observe(&s, r.addrs()[0], 0, WAIT).unwrap().is_none(),
        "UDP to the servers must be dropped too"
    );
    let open_ip = t.host("o1").unwrap().ip;
    let listen = |node: &str, addr: SocketAddr| {
        t.lab
            .in_ns(node, move || std::net::TcpListener::bind(addr))
            .unwrap()
            .unwrap()
    };
    let _l443 = listen(&t.server, SocketAddr::from((SERVER_PRIMARY, 443)));
    let _l80 = listen(&t.server, SocketAddr::from((SERVER_PRIMARY, 80)));
    let _l8443 = listen(&t.server, SocketAddr::from((SERVER_PRIMARY, 8443)));
    let _lo = listen("o1", SocketAddr::from((open_ip, 443)));
    let reaches = |to: SocketAddr| {
        t.lab
            .in_ns("x1", move || {
                std::net::TcpStream::connect_timeout(&to, WAIT).is_ok()
            })
            .unwrap()
    };
    assert!(reaches(SocketAddr::from((SERVER_PRIMARY, 443))));
    assert!(reaches(SocketAddr::from((SERVER_PRIMARY, 80))));
    assert!(!reaches(SocketAddr::from((SERVER_PRIMARY, 8443))));
    assert!(!reaches(SocketAddr::from((open_ip, 443))));
}

#[test]
fn cafe_hosts_share_one_public_address_and_reach_each_other_on_the_lan() {
    if !ready("cafe_hosts_share_one_public_address_and_reach_each_other_on_the_lan") {
        return;
    }
    let t = TopologySpec::named("cafe")
        .unwrap()
        .server_delay(Duration::ZERO)
        .build()
        .unwrap();
    let (c1, c2) = (
        t.host("cafe1").unwrap().clone(),
        t.host("cafe2").unwrap().clone(),
    );
    assert_eq!(c1.public_ip, c2.public_ip);
    let rtt = t.ping("cafe1", c2.ip, 3).unwrap();
    assert_eq!(rtt.received, 3, "{rtt}");
    let r = server_reflector(&t);
    let m1 = observe(&host_socket(&t, "cafe1"), r.addrs()[0], 0, WAIT)
        .unwrap()
        .unwrap();
    let m2 = observe(&host_socket(&t, "cafe2"), r.addrs()[0], 0, WAIT)
        .unwrap()
        .unwrap();
    assert_eq!(m1.ip(), m2.ip());
}

#[test]
fn cut_stops_traffic_between_two_hosts_and_restore_brings_it_back() {
    if !ready("cut_stops_traffic_between_two_hosts_and_restore_brings_it_back") {
        return;
    }
    let t = TopologySpec::new()
        .site("a", Nat::FullCone, 1)
        .site("b", Nat::Open, 1)
        .build()
        .unwrap();
    let b_ip = t.host("b1").unwrap().ip;
    let peer = Reflector::start(vec![t
        .lab
        .udp_socket("b1", SocketAddr::from((b_ip, 4000)))
        .unwrap()])
    .unwrap();
    let r = server_reflector(&t);
    let s = host_socket(&t, "a1");
    assert!(observe(&s, peer.addrs()[0], 0, WAIT).unwrap().is_some());
    t.cut_both("a1", "b1").unwrap();
    assert!(
        observe(&s, peer.addrs()[0], 0, WAIT).unwrap().is_none(),
        "cut path still carries traffic"
    );
    assert!(
        observe(&s, r.addrs()[0], 0, WAIT).unwrap().is_some(),
        "a cut must not touch the servers"
    );
    assert_eq!(t.ping("a1", b_ip, 1).map(|r| r.received).unwrap_or(0), 0);
    t.restore_both("a1", "b1").unwrap();
    assert!(
        observe(&s, peer.addrs()[0], 0, WAIT).unwrap().is_some(),
        "restored path is dead"
    );
}

#[test]
fn shaper_adds_the_configured_delay_each_way() {
    if !ready("shaper_adds_the_configured_delay_each_way") {
        return;
    }
    let delay = Duration::from_millis(25);
    let t = TopologySpec::new()
        .site("a", Nat::PortRestricted, 1)
        .server_delay(delay)
        .build()
        .unwrap();
    let rtt = t.ping("a1", SERVER_PRIMARY, 5).unwrap();
    println!("ping a1 -> server with {delay:?} each way: {rtt}");
    assert_eq!(rtt.received, 5, "{rtt}");
    assert!(rtt.min_ms >= 2.0 * delay.as_secs_f64() * 1e3, "{rtt}");
    // Traffic that does not touch the server link is not delayed.
    let inet_side = t
        .lab
        .exec("a", "ip", &["-4", "route", "show", "default"])
        .unwrap();
    let gw: Ipv4Addr = inet_side
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    let near = t.ping("a1", gw, 3).unwrap();
    assert!(near.min_ms < 2.0 * delay.as_secs_f64() * 1e3, "{near}");
}

#[test]
fn shaper_drops_packets_at_the_configured_loss() {
    if !ready("shaper_drops_packets_at_the_configured_loss") {
        return;
    }
    let t = TopologySpec::new()
        .site("a", Nat::PortRestricted, 1)
        .server_loss(0.3)
        .build()
        .unwrap();
    // ping exits 1 when replies are missing; the summary line is what matters.
    let (_, text) = t
        .lab
        .exec_any(
            "a1",
            "ping",
            &[
                "-n",
                "-q",
                "-c",
                "60",
                "-i",
                "0.02",
                "-W",
                "1",
                &SERVER_PRIMARY.to_string(),
            ],
        )
        .unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap();
    let received: u32 = line
        .split(',')
        .nth(1)
        .unwrap()
        .trim()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    println!("ping through 30% loss each way: {line}");
    // Expected 60 * 0.7 * 0.7 ≈ 29; the bounds are many standard deviations wide.
    assert!((5..=55).contains(&received), "{line}");
}

#[test]
fn lab_is_removed_on_drop_and_after_a_panic() {
    if !ready("lab_is_removed_on_drop_and_after_a_panic") {
        return;
    }
    let t = TopologySpec::named("pair").unwrap().build().unwrap();
    let prefix = format!("{}-", t.lab.prefix());
    assert!(natlab::lab::list_namespaces()
        .iter()
        .any(|n| n.starts_with(&prefix)));
    drop(t);
    assert!(!natlab::lab::list_namespaces()
        .iter()
        .any(|n| n.starts_with(&prefix)));

    let prefix = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let p2 = prefix.clone();
    let r = std::thread::spawn(move || {
        let t = TopologySpec::new()
            .site("a", Nat::PortRestricted, 1)
            .build()
            .unwrap();
        *p2.lock().unwrap() = format!("{}-", t.lab.prefix());
        panic!("deliberate panic inside a scenario");
    })
    .join();
    assert!(r.is_err());
    let prefix = prefix.lock().unwrap().clone();
    assert!(!prefix.is_empty());
    assert!(
        !natlab::lab::list_namespaces()
            .iter()
            .any(|n| n.starts_with(&prefix)),
        "left {prefix}*"
    );
}

#[test]
fn lab_is_removed_when_its_process_is_interrupted_or_killed() {
    if !ready("lab_is_removed_when_its_process_is_interrupted_or_killed") {
        return;
    }
    use std::io::BufRead;
    // SIGINT (Ctrl-C) and SIGKILL: no destructor runs, only the guardian can clean up.
    for signal in [libc::SIGINT, libc::SIGKILL] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_natlab"))
            .args(["hold", "pair"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        // "lab np<pid>-<n> — shells:"
        let prefix = format!("{}-", first.split_whitespace().nth(1).unwrap());
        assert!(prefix.starts_with("np"), "{first}");
        assert!(natlab::lab::list_namespaces()
            .iter()
            .any(|n| n.starts_with(&prefix)));
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(i32::try_from(child.id()).unwrap(), signal);
        }
        child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while natlab::lab::list_namespaces()
            .iter()
            .any(|n| n.starts_with(&prefix))
        {
            assert!(
                Instant::now() < deadline,
                "namespaces {prefix}* outlived their owner (signal {signal})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // The shaper it ran inside the lab is gone too.
        let ps = std::process::Command::new("ps")
            .args(["-eo", "args"])
            .output()
            .unwrap();
        assert!(!String::from_utf8_lossy(&ps.stdout).contains(&format!("{prefix}inet")));
    }
}

#[test]
fn stale_labs_of_dead_processes_are_removed_at_start() {
    if !ready("stale_labs_of_dead_processes_are_removed_at_start") {
        return;
    }
    // A pid that certainly is not running any more.
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let dead = c.id();
    c.wait().unwrap();
    let stale = format!("np{dead}-0-stale");
    natlab::sh::run("ip", &["netns", "add", &stale]).unwrap();
    // Another live process's lab (ours) must survive.
    let live = TopologySpec::new()
        .site("a", Nat::PortRestricted, 1)
        .build()
        .unwrap();
    let t = TopologySpec::new()
        .site("b", Nat::PortRestricted, 1)
        .build()
        .unwrap();
    let names = natlab::lab::list_namespaces();
    assert!(
        !names.contains(&stale),
        "stale lab {stale} survived a new run"
    );
    assert!(names
        .iter()
        .any(|n| n.starts_with(&format!("{}-", live.lab.prefix()))));
    drop(t);
}

#[test]
fn flow_sink_measures_the_gap_of_a_one_second_cut() {
    if !ready("flow_sink_measures_the_gap_of_a_one_second_cut") {
        return;
    }
    use natlab::traffic::{Flow, Sink};
    let t = TopologySpec::new()
        .site("a", Nat::PortRestricted, 1)
        .site("b", Nat::Open, 1)
        .build()
        .unwrap();
    let b_ip = t.host("b1").unwrap().ip;
    let sink = Sink::start(&t.lab, "b1", SocketAddr::from((b_ip, 5000))).unwrap();
    let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    let flow = Flow::start(&t.lab, "a1", any, sink.addr(), Duration::from_millis(10)).unwrap();
    assert!(sink
        .wait_arrival_after(Instant::now(), Duration::from_secs(5))
        .is_some());
    let cut_at = Instant::now();
    t.cut("a1", "b1").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    t.restore("a1", "b1").unwrap();
    let back = sink
        .wait_arrival_after(Instant::now(), Duration::from_secs(5))
        .expect("flow did not resume");
    std::thread::sleep(Duration::from_millis(200));
    let gap = sink.max_gap(cut_at, back);
    let sent = flow.sent();
    drop(flow);
    std::thread::sleep(Duration::from_millis(100));
    let lost = sink.lost(sent);
    println!("1 s cut: gap {gap:?}, {lost} of {sent} datagrams lost");
    assert!(gap >= Duration::from_millis(900), "{gap:?}");
    assert!(lost >= 50, "{lost}");
}
