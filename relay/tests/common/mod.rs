//! Helpers shared by the relay integration tests.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use meshpunch_proto::creds;
use meshpunch_proto::turn_client::TurnCredentials;
use meshpunch_relay::config::{FileConfig, Overrides, RelayConfig};

pub const SECRET: &str = "interop-secret";
pub const T: Duration = Duration::from_secs(10);

/// A relayed port range unlikely to collide with parallel tests (ports that fail to bind
/// are skipped by the pool anyway). 50 ports: coturn's uclient asks for even ports, the pool
/// is split between the workers and uclient does not always release its allocations, so 20
/// ports ran out (508) in the second uclient run now and then.
pub fn port_range(slot: u16) -> String {
    let base = 20_000 + (std::process::id() % 80) as u16 * 500 + (slot % 10) * 50;
    format!("{}-{}", base, base + 49)
}

pub fn relay_config(allow_loopback: bool, slot: u16) -> RelayConfig {
    let o = Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        relay_ips: vec!["127.0.0.1".parse().unwrap()],
        ports: Some(port_range(slot)),
        realm: Some("meshpunch.test".into()),
        auth_secret: Some(SECRET.into()),
        allow_loopback_peers: allow_loopback,
        ..Default::default()
    };
    let file = FileConfig {
        workers: Some(2),
        ..Default::default()
    };
    RelayConfig::resolve(file, o, None).unwrap()
}

pub fn rest_creds(secret: &str, user: &str) -> TurnCredentials {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let c = creds::rest_credentials(secret.as_bytes(), now + 3600, user);
    TurnCredentials {
        username: c.username,
        password: c.password,
    }
}

pub fn peer_socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

pub fn any_local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Path of a binary of this workspace (built by `cargo build --workspace --bins`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    dir.join(name)
}

/// A free UDP port on 127.0.0.1 (for third-party servers that need one on the command line).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
