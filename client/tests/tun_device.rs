//! The built-in WireGuard device (`client/src/tun/`) with real TUN devices in two network
//! namespaces: the encrypted datagrams travel between the two devices over real UDP sockets
//! on loopback, the way the daemon's data socket would carry them. `ping` and an `iperf3` TCP
//! transfer run through the tunnel; the cryptokey routing source check, decrypt failures and
//! each set-up refusal (name taken, address colliding with a route, no CAP_NET_ADMIN) are
//! checked against the kernel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use meshpunch::keys::{generate_private, public_of};
use meshpunch::tun::{Buffers, Device, TunError, TunIface, TunPeer, TunSettings, TICK};
use natlab::lab::Lab;
use natlab::testenv;
use tokio::net::UdpSocket;

fn settings(name: &str, addr: &str, peer_key: [u8; 32], peer_allowed: &[&str]) -> TunSettings {
    TunSettings {
        name: name.into(),
        addresses: vec![addr.parse().unwrap()],
        mtu: 1412,
        peers: vec![TunPeer {
            label: "peer".into(),
            public_key: peer_key,
            preshared_key: None,
            allowed_ips: peer_allowed.iter().map(|a| a.parse().unwrap()).collect(),
        }],
        full_tunnel: None,
    }
}

/// Drives one device: TUN → encrypt → `sock` → the other side, and `sock` → decrypt → TUN.
fn drive(dev: Arc<Device>, sock: Arc<UdpSocket>, other: SocketAddr) {
    let (d, s) = (dev.clone(), sock.clone());
    tokio::spawn(async move {
        let _ = d
            .run(|_, dg| {
                let _ = s.try_send_to(dg, other);
            })
            .await;
    });
    let (d, s) = (dev.clone(), sock.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        let mut b = Buffers::default();
        loop {
            let Ok((n, _)) = s.recv_from(&mut buf).await else {
                return;
            };
            d.deliver(0, &buf[..n], &mut b, |_, dg| {
                let _ = s.try_send_to(dg, other);
            });
        }
    });
    tokio::spawn(async move {
        let mut b = Buffers::default();
        loop {
            tokio::time::sleep(TICK).await;
            dev.tick(&mut b, |_, dg| {
                let _ = sock.try_send_to(dg, other);
            });
        }
    });
}

struct Pair {
    lab: Lab,
    a: Arc<Device>,
    b: Arc<Device>,
}

/// Two namespaces, a TUN device in each (10.9.0.1 and 10.9.0.2, plus `v6` addresses
/// fd00:9::1/64 and fd00:9::2/64 with IPv6 enabled), driven over loopback.
async fn pair(test: &str, a_allowed_for_b: &[&str]) -> Option<Pair> {
    pair_with(test, a_allowed_for_b, false).await
}

async fn pair_with(test: &str, a_allowed_for_b: &[&str], v6: bool) -> Option<Pair> {
    if !testenv::require_root(test) {
        return None;
    }
    let mut lab = Lab::new().unwrap();
    lab.add_node("a", false).unwrap();
    lab.add_node("b", false).unwrap();
    let mut b_allowed_for_a = vec!["10.9.0.1/32"];
    if v6 {
        for n in ["a", "b"] {
            lab.exec(
                n,
                "sysctl",
                &["-q", "-w", "net.ipv6.conf.all.disable_ipv6=0"],
            )
            .unwrap();
            lab.exec(
                n,
                "sysctl",
                &["-q", "-w", "net.ipv6.conf.default.disable_ipv6=0"],
            )
            .unwrap();
        }
        b_allowed_for_a.push("fd00:9::1/128");
    }
    let (ka, kb) = (generate_private(), generate_private());
    let mut sa = settings("mptun-a", "10.9.0.1/24", public_of(&kb), a_allowed_for_b);
    let mut sb = settings("mptun-b", "10.9.0.2/24", public_of(&ka), &b_allowed_for_a);
    if v6 {
        sa.addresses.push("fd00:9::1/64".parse().unwrap());
        sb.addresses.push("fd00:9::2/64".parse().unwrap());
    }
    let ia = lab
        .in_ns("a", move || TunIface::create(&sa))
        .unwrap()
        .unwrap();
    let ib = lab
        .in_ns("b", move || TunIface::create(&sb))
        .unwrap()
        .unwrap();
    let a = Arc::new(Device::new(ia, ka, &[tunpeer(public_of(&kb), a_allowed_for_b)]).unwrap());
    let b = Arc::new(Device::new(ib, kb, &[tunpeer(public_of(&ka), &b_allowed_for_a)]).unwrap());
    let ua = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let ub = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    drive(a.clone(), ua.clone(), ub.local_addr().unwrap());
    drive(b.clone(), ub.clone(), ua.local_addr().unwrap());
    Some(Pair { lab, a, b })
}

fn tunpeer(key: [u8; 32], allowed: &[&str]) -> TunPeer {
    TunPeer {
        label: "peer".into(),
        public_key: key,
        preshared_key: None,
        allowed_ips: allowed.iter().map(|a| a.parse().unwrap()).collect(),
    }
}

async fn ping(lab: &Lab, node: &str, dst: &str, count: u32) -> (bool, String) {
    let (lab_ns, dst, count) = (lab.ns(node), dst.to_string(), count.to_string());
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", &lab_ns, "ping", "-n", "-c", &count, "-i", "0.2", "-W", "2", &dst,
            ])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tun_devices_ping_and_carry_tcp() {
    let test = "two_tun_devices_ping_and_carry_tcp";
    if !testenv::require_commands(test, &["ip", "ping", "iperf3"]) {
        return;
    }
    let Some(mut p) = pair(test, &["10.9.0.2/32"]).await else {
        return;
    };
    // The first ping waits for the handshake (its packet is queued meanwhile, not lost).
    let (ok, out) = ping(&p.lab, "a", "10.9.0.2", 5).await;
    assert!(ok, "ping through the tunnel: {out}");
    assert!(p.a.last_handshake(0).is_some());

    // An iperf3 TCP transfer, 2 s, through the tunnel.
    let iperf = testenv::which("iperf3").unwrap();
    p.lab
        .spawn(
            "b",
            "iperf3-server",
            &iperf,
            &["-s".into(), "-1".into(), "-B".into(), "10.9.0.2".into()],
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ns_a = p.lab.ns("a");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("ip")
            .args([
                "netns", "exec", &ns_a, "iperf3", "-c", "10.9.0.2", "-t", "2", "-J",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 output: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let bytes = json["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    println!(
        "iperf3 through two TUN devices: {bytes} bytes, {:.1} Mbit/s",
        bps / 1e6
    );
    assert!(bytes > 1_000_000, "TCP transfer through the tunnel: {json}");
    assert_eq!(p.a.stats.bad_source.load(Ordering::Relaxed), 0);
    assert!(p.b.stats.rx_bytes.load(Ordering::Relaxed) >= bytes);

    // Decrypt failures (garbage, a replayed or forged data packet) are counted and the
    // tunnel keeps working.
    let mut b = Buffers::default();
    let before = p.b.stats.decrypt_failed.load(Ordering::Relaxed);
    let mut forged = vec![4u8, 0, 0, 0];
    forged.extend_from_slice(&[0x55; 60]);
    p.b.deliver(0, &forged, &mut b, |_, _| {
        panic!("nothing answers a forged packet")
    });
    p.b.deliver(0, &[1, 2, 3], &mut b, |_, _| {
        panic!("nothing answers garbage")
    });
    assert_eq!(p.b.stats.decrypt_failed.load(Ordering::Relaxed), before + 2);
    let (ok, out) = ping(&p.lab, "a", "10.9.0.2", 2).await;
    assert!(ok, "ping after bad datagrams: {out}");

    p.lab.teardown();
}

/// Cryptokey routing: a peer may only send from its `AllowedIPs`. b's packets from an
/// address outside what a allows for b are dropped by a and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_from_outside_allowed_ips_is_dropped_and_counted() {
    let test = "packet_from_outside_allowed_ips_is_dropped_and_counted";
    if !testenv::require_commands(test, &["ip", "ping"]) {
        return;
    }
    let Some(p) = pair(test, &["10.9.0.2/32"]).await else {
        return;
    };
    let (ok, out) = ping(&p.lab, "b", "10.9.0.1", 2).await;
    assert!(ok, "ping b -> a: {out}");
    assert_eq!(p.a.stats.bad_source.load(Ordering::Relaxed), 0);
    // b sends from 10.66.0.5 (a local address of b's, not in a's AllowedIPs for b).
    p.lab
        .ip("b", &["addr", "add", "10.66.0.5/32", "dev", "lo"])
        .unwrap();
    let ns_b = p.lab.ns("b");
    let (ok, _) = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns_b,
                "ping",
                "-n",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                "10.66.0.5",
                "10.9.0.1",
            ])
            .output()
            .unwrap();
        (out.status.success(), ())
    })
    .await
    .unwrap();
    assert!(!ok, "a must not answer a spoofed source");
    assert_eq!(p.a.stats.bad_source.load(Ordering::Relaxed), 3);
    // The legitimate source still works.
    let (ok, out) = ping(&p.lab, "b", "10.9.0.1", 2).await;
    assert!(ok, "ping b -> a after the spoofed packets: {out}");
}

/// IPv6 `Address` and `AllowedIPs` next to IPv4 ones on the same device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_and_ipv4_through_one_device() {
    let test = "ipv6_and_ipv4_through_one_device";
    if !testenv::require_commands(test, &["ip", "ping", "sysctl"]) {
        return;
    }
    let Some(p) = pair_with(test, &["10.9.0.2/32", "fd00:9::2/128"], true).await else {
        return;
    };
    let (ok, out) = ping(&p.lab, "a", "10.9.0.2", 3).await;
    assert!(ok, "IPv4 ping: {out}");
    let (ok, out) = ping(&p.lab, "a", "fd00:9::2", 3).await;
    assert!(ok, "IPv6 ping through the tunnel: {out}");
    assert_eq!(p.a.stats.bad_source.load(Ordering::Relaxed), 0);
}

#[test]
fn tun_setup_refusals_say_what_to_fix() {
    let test = "tun_setup_refusals_say_what_to_fix";
    if !testenv::require_root(test) || !testenv::require_commands(test, &["ip"]) {
        return;
    }
    let mut lab = Lab::new().unwrap();
    lab.add_node("a", false).unwrap();
    let k = public_of(&generate_private());

    // The name exists already (one end of a veth pair).
    lab.ip(
        "a",
        &[
            "link", "add", "taken0", "type", "veth", "peer", "name", "taken1",
        ],
    )
    .unwrap();
    let s = settings("taken0", "10.9.0.1/24", k, &["10.9.0.2/32"]);
    let e = lab
        .in_ns("a", move || TunIface::create(&s))
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, TunError::Exists { .. }), "{e}");
    assert!(e.to_string().contains("already exists"), "{e}");

    // The tunnel subnet is a LAN of this machine already.
    lab.ip("a", &["link", "set", "taken0", "up"]).unwrap();
    lab.ip("a", &["addr", "add", "10.77.0.9/24", "dev", "taken0"])
        .unwrap();
    let s = settings("mptun-c", "10.77.0.1/24", k, &["10.77.0.2/32"]);
    let e = lab
        .in_ns("a", move || TunIface::create(&s))
        .unwrap()
        .unwrap_err();
    assert!(
        e.to_string().contains(
            "Address 10.77.0.1/24 collides with the existing route 10.77.0.0/24 dev taken0"
        ),
        "{e}"
    );
    // Nothing was created by the refused start.
    assert!(!lab.ip("a", &["link", "show"]).unwrap().contains("mptun-c"));

    // A peer's AllowedIPs routed through another interface.
    let s = settings("mptun-c", "10.9.0.1/24", k, &["10.77.0.0/24"]);
    let e = lab
        .in_ns("a", move || TunIface::create(&s))
        .unwrap()
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("AllowedIPs 10.77.0.0/24 of peer peer collides"),
        "{e}"
    );

    // IPv6 is disabled in this namespace: said so, not mistaken for a permission problem.
    let mut s = settings("mptun-c", "10.9.0.1/24", k, &["10.9.0.2/32"]);
    s.addresses.push("fd00:9::1/64".parse().unwrap());
    let e = lab
        .in_ns("a", move || TunIface::create(&s))
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("is IPv6 disabled here?"), "{e}");
    assert!(!lab.ip("a", &["link", "show"]).unwrap().contains("mptun-c"));

    // No CAP_NET_ADMIN (dropped on the creating thread only).
    let s = settings("mptun-c", "10.9.0.1/24", k, &["10.9.0.2/32"]);
    let e = lab
        .in_ns("a", move || {
            drop_capabilities();
            TunIface::create(&s)
        })
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, TunError::NoPermission { .. }), "{e}");
    assert!(
        e.to_string().contains("run as root or give CAP_NET_ADMIN"),
        "{e}"
    );

    // And the good one works, and its interface goes away with it.
    let s = settings(
        "mptun-c",
        "10.9.0.1/24",
        k,
        &["10.9.0.2/32", "192.168.77.0/24"],
    );
    let iface = lab
        .in_ns("a", move || TunIface::create(&s))
        .unwrap()
        .unwrap();
    let routes = lab.ip("a", &["route", "show", "dev", "mptun-c"]).unwrap();
    assert!(
        routes.contains("10.9.0.0/24") && routes.contains("192.168.77.0/24"),
        "{routes}"
    );
    let link = lab.ip("a", &["link", "show", "mptun-c"]).unwrap();
    assert!(link.contains("mtu 1412") && link.contains(",UP"), "{link}");
    drop(iface);
    assert!(lab.ip("a", &["link", "show", "mptun-c"]).is_err());
}

/// Clears every capability of the calling thread (capset(2) acts per thread).
fn drop_capabilities() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let h = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let d = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset with a valid v3 header and two data structs.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &h, d.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
}
