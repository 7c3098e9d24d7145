//! Real WireGuard in lab hosts: userspace `boringtun-cli` (the kernel module may be missing)
//! configured with `wg`.
//!
//! boringtun keeps its control socket at `/var/run/wireguard/<iface>.sock`, a path every
//! namespace shares, so interface names are unique per process and lab (`w<pid%10000><n>`),
//! and the socket is removed when the interface goes.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::topo::Topology;
use crate::Error;

static IFACE_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A WireGuard interface running in a lab host.
#[derive(Debug, Clone)]
pub struct WgIface {
    /// Host (node) it runs in.
    pub host: String,
    /// Interface name.
    pub name: String,
    /// Tunnel address (/24).
    pub addr: Ipv4Addr,
    /// Base64 private key.
    pub private_key: String,
    /// Base64 public key.
    pub public_key: String,
    /// UDP port WireGuard listens on.
    pub listen_port: u16,
    proc_name: String,
}

/// A fresh WireGuard key pair `(private, public)` from `wg genkey` / `wg pubkey`.
pub fn keypair() -> Result<(String, String), Error> {
    let private = crate::sh::run("wg", &["genkey"])?.trim().to_string();
    let public = crate::sh::run_input("wg", &["pubkey"], Some(&format!("{private}\n")))?
        .trim()
        .to_string();
    Ok((private, public))
}

fn socket_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{name}.sock"))
}

impl WgIface {
    /// Starts boringtun in `host` with tunnel address `addr`/24 listening on `listen_port`,
    /// using `keys` (private, public) or fresh ones.
    pub fn start(
        topo: &mut Topology,
        host: &str,
        addr: Ipv4Addr,
        listen_port: u16,
        keys: Option<(String, String)>,
    ) -> Result<WgIface, Error> {
        let n = IFACE_COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("w{}{n}", std::process::id() % 10000);
        let (private_key, public_key) = match keys {
            Some(k) => k,
            None => keypair()?,
        };
        let proc_name = format!("boringtun-{host}");
        topo.lab.remove_on_teardown(socket_path(&name));
        let w = WgIface {
            host: host.to_string(),
            name,
            addr,
            private_key,
            public_key,
            listen_port,
            proc_name,
        };
        w.spawn(topo)?;
        w.configure(topo)?;
        Ok(w)
    }

    /// Adds (or updates) `peer` with its tunnel address, an optional endpoint and a keepalive.
    pub fn set_peer(
        &self,
        topo: &Topology,
        peer: &WgIface,
        endpoint: Option<SocketAddr>,
        keepalive_secs: u16,
    ) -> Result<(), Error> {
        let allowed = format!("{}/32", peer.addr);
        let ka = keepalive_secs.to_string();
        let ep = endpoint.map(|e| e.to_string());
        let mut args = vec![
            "set",
            &self.name,
            "peer",
            &peer.public_key,
            "allowed-ips",
            &allowed,
        ];
        if let Some(ep) = ep.as_deref() {
            args.extend_from_slice(&["endpoint", ep]);
        }
        if keepalive_secs > 0 {
            args.extend_from_slice(&["persistent-keepalive", &ka]);
        }
        topo.lab.exec(&self.host, "wg", &args).map(|_| ())
    }

    /// Process id of this interface's boringtun-cli, while it runs.
    pub fn pid(&self, topo: &Topology) -> Option<u32> {
        topo.lab.pid(&self.proc_name)
    }

    /// `wg show <iface> dump` output.
    pub fn dump(&self, topo: &Topology) -> Result<String, Error> {
        topo.lab
            .exec(&self.host, "wg", &["show", &self.name, "dump"])
    }

    /// Re-creates the interface under the same name, key, listen port and address (what
    /// `wg-quick down; wg-quick up` does): stops boringtun, waits for the link to go, starts
    /// it again. Peers are not restored (add them again, as wg-quick would from its config).
    pub fn recreate(&self, topo: &mut Topology) -> Result<(), Error> {
        self.stop(topo);
        let deadline = Instant::now() + Duration::from_secs(10);
        while topo
            .lab
            .ip(&self.host, &["link", "show", &self.name])
            .is_ok()
        {
            if Instant::now() > deadline {
                return Err(Error::Setup(format!("{} did not go away", self.name)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.spawn(topo)?;
        self.configure(topo)
    }

    fn spawn(&self, topo: &mut Topology) -> Result<(), Error> {
        let bin = crate::testenv::which("boringtun-cli").ok_or_else(|| {
            Error::Setup("boringtun-cli is not installed (cargo install boringtun-cli)".into())
        })?;
        let _ = std::fs::remove_file(socket_path(&self.name));
        let args = vec![
            "--foreground".to_string(),
            "--disable-drop-privileges".to_string(),
            "--threads".to_string(),
            "1".to_string(),
            "--log".to_string(),
            topo.lab
                .log_dir()
                .join(format!("{}.trace", self.proc_name))
                .display()
                .to_string(),
            self.name.clone(),
        ];
        topo.lab.spawn(&self.host, &self.proc_name, &bin, &args)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket_path(&self.name).exists() {
            if Instant::now() > deadline || !topo.lab.is_running(&self.proc_name) {
                return Err(Error::Setup(format!(
                    "boringtun did not start: {}",
                    topo.lab.log(&self.proc_name)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn configure(&self, topo: &mut Topology) -> Result<(), Error> {
        let key_file = topo.lab.log_dir().join(format!("{}.key", self.name));
        std::fs::write(&key_file, format!("{}\n", self.private_key))?;
        let key_path = key_file.display().to_string();
        let r = topo.lab.exec(
            &self.host,
            "wg",
            &[
                "set",
                &self.name,
                "private-key",
                &key_path,
                "listen-port",
                &self.listen_port.to_string(),
            ],
        );
        let _ = std::fs::remove_file(&key_file);
        r?;
        topo.lab.ip(
            &self.host,
            &[
                "addr",
                "add",
                &format!("{}/24", self.addr),
                "dev",
                &self.name,
            ],
        )?;
        topo.lab
            .ip(&self.host, &["link", "set", &self.name, "up"])?;
        Ok(())
    }

    /// Stops boringtun and removes its control socket.
    pub fn stop(&self, topo: &mut Topology) {
        topo.lab.stop(&self.proc_name);
        let _ = std::fs::remove_file(socket_path(&self.name));
    }
}
