//! Helpers shared by the smoke tests: free ports, a coturn `turnserver` child process.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A UDP port the OS just handed out on 127.0.0.1 (released again for the server to take).
pub(crate) fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral port");
    s.local_addr().expect("local addr").port()
}

/// A child process killed on drop.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
    _dir: Option<tempfile::TempDir>,
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts coturn with REST-API auth on a free loopback port, loopback peers allowed and
/// `threads` relay threads, as BENCHMARKS.md does.
pub(crate) fn start_coturn(secret: &str, threads: usize) -> Proc {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_udp_port();
    let child = Command::new("turnserver")
        .args([
            "-n",
            "--listening-ip",
            "127.0.0.1",
            "--relay-ip",
            "127.0.0.1",
        ])
        .args(["-p", &port.to_string()])
        .args(["--use-auth-secret", "--static-auth-secret", secret])
        .args(["--realm", "meshpunch.test", "--allow-loopback-peers"])
        .args([
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--no-software-attribute",
        ])
        .args(["-m", &threads.to_string()])
        .arg("--db")
        .arg(dir.path().join("turndb"))
        .arg("--pidfile")
        .arg(dir.path().join("turnserver.pid"))
        .args(["--log-file", "stdout", "--simple-log"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn turnserver");
    Proc {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        _dir: Some(dir),
    }
}

/// Retries `f` until it succeeds or `within` passes (servers take a moment to listen).
pub(crate) fn retry<T, E: std::fmt::Debug>(
    within: Duration,
    mut f: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying: {e:?}");
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => panic!("gave up after {within:?}: {e:?}"),
        }
    }
}

/// Path of a workspace binary next to this test's target directory.
pub(crate) fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|p| p.parent())
        .map(|p| p.join(name))
        .expect("target dir")
}
