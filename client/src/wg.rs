//! `--wg-interface`: read the peers of an existing WireGuard interface with `wg show IFACE
//! dump` and point each peer's endpoint at its local proxy port with `wg set`.

use std::net::SocketAddr;
use std::process::Command;

use crate::config::{parse_wg_dump, WgDump};
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

/// Runs `wg set IFACE peer KEY endpoint ADDR`.
pub fn set_endpoint(iface: &str, key: &[u8; 32], endpoint: SocketAddr) -> anyhow::Result<()> {
    let k = format_key(key);
    let out = Command::new("wg")
        .args(["set", iface, "peer", &k, "endpoint", &endpoint.to_string()])
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run `wg set`: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "`wg set {iface} peer {k} endpoint {endpoint}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
