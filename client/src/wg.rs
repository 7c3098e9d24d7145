//! `--wg-interface`: read the peers of an existing WireGuard interface with `wg show IFACE
//! dump` and point each peer's endpoint at its local proxy port with `wg set`.

use std::net::SocketAddr;
use std::process::Command;

use crate::config::{parse_wg_dump, WgDump, WgPeer};
use crate::keys::format_key;

/// Runs `wg show IFACE dump` and parses it.
pub fn show_dump(iface: &str) -> anyhow::Result<WgDump> {
    let out = Command::new("wg")
        .args(["show", iface, "dump"])
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run `wg show {iface} dump`: {e} (is wireguard-tools installed?)"
            )
        })?;
    if !out.status.success() {
        anyhow::bail!(
            "`wg show {iface} dump` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_wg_dump(&String::from_utf8_lossy(&out.stdout))
        .map_err(|e| anyhow::anyhow!("`wg show {iface} dump`: {e}"))
}

/// Points `peer` of `iface` at `endpoint`: removes the peer, then adds it again with the new
/// endpoint (keeping its allowed IPs, keepalive and preshared key). Userspace WireGuard
/// (boringtun) cannot modify an existing peer, and it must be two `wg set` calls: in one call
/// `wg` merges both sections of the same key into one peer that still carries `remove`, which
/// leaves the interface with no peer at all. The kernel accepts this form as well.
pub fn set_endpoint(iface: &str, peer: &WgPeer, endpoint: SocketAddr) -> anyhow::Result<()> {
    let k = format_key(&peer.public_key);
    run_wg(
        iface,
        &k,
        endpoint,
        &[
            "set".into(),
            iface.into(),
            "peer".into(),
            k.clone(),
            "remove".into(),
        ],
    )?;
    let mut args: Vec<String> = vec![
        "set".into(),
        iface.into(),
        "peer".into(),
        k.clone(),
        "endpoint".into(),
        endpoint.to_string(),
        "allowed-ips".into(),
        peer.allowed_ips.clone(),
    ];
    if let Some(ka) = peer.persistent_keepalive {
        args.push("persistent-keepalive".into());
        args.push(ka.to_string());
    }
    // The preshared key goes through a private temporary file, never the command line.
    let psk_file = match &peer.preshared_key {
        Some(psk) => {
            let f = tempfile_with(psk)?;
            args.push("preshared-key".into());
            args.push(f.display().to_string());
            Some(f)
        }
        None => None,
    };
    let res = run_wg(iface, &k, endpoint, &args);
    if let Some(f) = psk_file {
        let _ = std::fs::remove_file(f);
    }
    res
}

fn run_wg(iface: &str, k: &str, endpoint: SocketAddr, args: &[String]) -> anyhow::Result<()> {
    let out = Command::new("wg")
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run `wg set`: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "`wg set {iface} peer {k} ...` (endpoint {endpoint}) failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn tempfile_with(content: &str) -> anyhow::Result<std::path::PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = std::env::temp_dir().join(format!(
        "meshpunch-psk-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(content.as_bytes())?;
    Ok(path)
}
