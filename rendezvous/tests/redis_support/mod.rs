//! A private `redis-server` for one test: started on a free loopback port with persistence off,
//! stopped (killed) on drop, restartable on the same port to test outages.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// True when `redis-server` is installed; otherwise prints SKIP (fails in CI).
pub(crate) fn available(test: &str) -> bool {
    natlab::testenv::require_commands(test, &["redis-server"])
}

/// A running (or stopped) private Redis.
pub(crate) struct RedisServer {
    child: Option<Child>,
    port: u16,
    /// `--tls-port` instead of `--port`, with these certificate and key files.
    tls: Option<(String, String)>,
    /// Further server options (cluster mode, replication).
    extra: Vec<String>,
    /// Run as a Sentinel with this config file.
    sentinel_conf: Option<std::path::PathBuf>,
    /// Working directory: replication writes RDB files there even with `--save ""`.
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one on a port the OS picked.
    pub(crate) fn start() -> Self {
        Self::start_with(None, Vec::new(), None)
    }

    /// Starts one with further `redis-server` options (e.g. `--cluster-enabled yes`).
    pub(crate) fn start_args(extra: &[&str]) -> Self {
        Self::start_with(None, extra.iter().map(|s| s.to_string()).collect(), None)
    }

    /// Starts a Sentinel watching the master at `master_port` as `master_name` (quorum 1, a
    /// master is "down" after 1 s); its config file lives in `dir`.
    pub(crate) fn start_sentinel(
        dir: &std::path::Path,
        master_name: &str,
        master_port: u16,
    ) -> Self {
        let conf = dir.join(format!("sentinel-{}.conf", free_port()));
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor {master_name} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {master_name} 1000\n\
                 sentinel failover-timeout {master_name} 5000\n"
            ),
        )
        .expect("write sentinel.conf");
        Self::start_with(None, Vec::new(), Some(conf))
    }

    /// Starts one that speaks only TLS, with the given PEM certificate chain and key files.
    pub(crate) fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Self {
        let tls = (cert.display().to_string(), key.display().to_string());
        Self::start_with(Some(tls), Vec::new(), None)
    }

    fn start_with(
        tls: Option<(String, String)>,
        extra: Vec<String>,
        sentinel_conf: Option<std::path::PathBuf>,
    ) -> Self {
        // A port another process grabs between our probe and redis' bind makes redis exit: retry.
        for _ in 0..5 {
            let port = free_port();
            let mut s = RedisServer {
                child: None,
                port,
                tls: tls.clone(),
                extra: extra.clone(),
                sentinel_conf: sentinel_conf.clone(),
                dir: tempfile::tempdir().expect("redis dir"),
            };
            if s.spawn() {
                return s;
            }
        }
        panic!("redis-server did not start");
    }

    fn spawn(&mut self) -> bool {
        let mut cmd = Command::new(natlab::testenv::which("redis-server").expect("redis-server"));
        if let Some(conf) = &self.sentinel_conf {
            cmd.arg(conf).arg("--sentinel");
            cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"]);
            return self.run(cmd);
        }
        match &self.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some((cert, key)) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .args(["--tls-cert-file", cert, "--tls-key-file", key])
                .args(["--tls-ca-cert-file", cert, "--tls-auth-clients", "no"]),
        };
        cmd.args(["--bind", "127.0.0.1"]).args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ]);
        cmd.arg("--dir").arg(self.dir.path());
        cmd.args(&self.extra);
        self.run(cmd)
    }

    fn run(&mut self, mut cmd: Command) -> bool {
        let child = cmd
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The port it listens on.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/` (`rediss://` for a TLS server).
    pub(crate) fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (all data is lost, as in a crash without persistence).
    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the server: connections stay open, nothing answers.
    pub(crate) fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let sig = if frozen { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} {pid}");
    }

    /// Starts it again on the same port.
    pub(crate) fn restart(&mut self) {
        self.stop();
        for _ in 0..50 {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("redis-server did not restart on port {}", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A frozen server ignores nothing but SIGKILL, which stop() sends; thaw it anyway so
            // it can exit cleanly if the kill races.
            let _ = Command::new("kill")
                .args([
                    "-CONT",
                    &self.child.as_ref().map(|c| c.id()).unwrap_or(0).to_string(),
                ])
                .status();
        }
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes; returns the time it took.
pub(crate) async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}
