//! The `meshpunch` binary's key commands against WireGuard's `wg`, and config errors.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::process::{Command, Stdio};

fn meshpunch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshpunch"))
}

fn pipe(mut cmd: Command, input: &str) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn have_wg() -> bool {
    Command::new("wg")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn keygen_and_pubkey_match_wireguard_tools() {
    let out = meshpunch().arg("keygen").output().unwrap();
    assert!(out.status.success());
    let sk = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(sk.len(), 44);
    let mut pk_cmd = meshpunch();
    pk_cmd.arg("pubkey");
    let pk = pipe(pk_cmd, &format!("{sk}\n"));
    assert_eq!(pk.len(), 44);
    if !have_wg() {
        if std::env::var_os("CI").is_some() {
            panic!("wireguard-tools (wg) missing in CI");
        }
        eprintln!("skipping the comparison with wg: wireguard-tools not installed");
        return;
    }
    let mut wg = Command::new("wg");
    wg.arg("pubkey");
    assert_eq!(pipe(wg, &format!("{sk}\n")), pk);
    // And a key made by wg gives the same public key with meshpunch.
    let wsk = String::from_utf8(Command::new("wg").arg("genkey").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string();
    let mut wg = Command::new("wg");
    wg.arg("pubkey");
    let mut mp = meshpunch();
    mp.arg("pubkey");
    assert_eq!(pipe(wg, &wsk), pipe(mp, &wsk));
}

#[test]
fn bad_config_line_is_reported_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.conf");
    std::fs::write(&path, "[Interface]\nPrivateKey = nope\n").unwrap();
    let out = meshpunch()
        .args(["up", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:2: PrivateKey: expected a WireGuard key",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn status_without_daemon_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = meshpunch()
        .args(["status", "--control-socket"])
        .arg(dir.path().join("none.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `meshpunch up` running?"));
}

#[test]
fn down_without_daemon_says_so() {
    let sock = std::env::temp_dir().join(format!("meshpunch-down-{}.sock", std::process::id()));
    let out = meshpunch()
        .args(["down", "--control-socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no daemon is running"), "{err}");
}

#[test]
fn up_without_config_names_the_default_config() {
    let help = meshpunch().args(["up", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("/etc/meshpunch/meshpunch.conf"), "{help}");
    assert!(
        help.contains("--private-key-file") && help.contains("--fwmark"),
        "{help}"
    );
    if std::path::Path::new("/etc/meshpunch/meshpunch.conf").exists() {
        return;
    }
    let out = meshpunch().arg("up").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/etc/meshpunch/meshpunch.conf does not exist") && err.contains("--config"),
        "{err}"
    );
}

/// A static-peer config that gets as far as binding the data socket.
fn static_config(dir: &std::path::Path) -> std::path::PathBuf {
    let sk = String::from_utf8(meshpunch().arg("keygen").output().unwrap().stdout).unwrap();
    let pk = String::from_utf8(meshpunch().arg("keygen").output().unwrap().stdout).unwrap();
    let conf = dir.join("m.conf");
    std::fs::write(
        &conf,
        format!(
            "[Interface]\nPrivateKey = {}\nControlSocket = {}\n\n[Peer]\nPublicKey = {}\nCandidate = 127.0.0.1:9\n",
            sk.trim(),
            dir.join("m.sock").display(),
            pk.trim()
        ),
    )
    .unwrap();
    conf
}

#[test]
fn private_key_file_errors_name_the_file() {
    let dir = std::env::temp_dir().join(format!("meshpunch-pkf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = static_config(&dir);
    let bad = dir.join("bad.key");
    std::fs::write(&bad, "not a key\n").unwrap();
    let out = meshpunch()
        .args(["up", "--listen-ip", "127.0.0.1", "--config"])
        .arg(&conf)
        .arg("--private-key-file")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("private key file") && err.contains("bad.key"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// SO_MARK needs CAP_NET_ADMIN: without it `meshpunch up --fwmark` stops with a message
/// that says so (as root the test drops to nobody with setpriv).
#[test]
fn fwmark_without_cap_net_admin_is_a_clear_error() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let dir = std::env::temp_dir().join(format!("meshpunch-fwmark-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = static_config(&dir);
    let mut cmd = if root {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_meshpunch"));
        c
    } else {
        meshpunch()
    };
    let out = cmd
        .args([
            "up",
            "--listen-ip",
            "127.0.0.1",
            "--fwmark",
            "51820",
            "--config",
        ])
        .arg(&conf)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot set FwMark 51820") && err.contains("CAP_NET_ADMIN"),
        "{err}"
    );
}

/// A full tunnel in tun mode needs the mark that keeps meshpunch's own packets out of it:
/// `--fwmark off` with `AllowedIPs = 0.0.0.0/0` is refused before anything is created; and
/// `meshpunch reload` without a daemon says so.
#[test]
fn full_tunnel_without_fwmark_and_reload_without_daemon_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("ft.conf");
    std::fs::write(
        &conf,
        format!(
            "[Interface]\nPrivateKey = {}\nMode = tun\nTunName = mpft0\nAddress = 10.9.0.1/24\n\n[Peer]\nPublicKey = {}\nCandidate = 127.0.0.1:9\nAllowedIPs = 0.0.0.0/0\n",
            meshpunch::keys::format_key(&meshpunch::keys::generate_private()),
            meshpunch::keys::format_key(&meshpunch::keys::generate_private()),
        ),
    )
    .unwrap();
    let out = meshpunch()
        .args(["up", "--fwmark", "off", "--config"])
        .arg(&conf)
        .arg("--control-socket")
        .arg(dir.path().join("ft.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("(a full tunnel) needs FwMark"), "{err}");
    assert!(!std::path::Path::new("/sys/class/net/mpft0").exists());

    let out = meshpunch()
        .args(["reload", "--control-socket"])
        .arg(dir.path().join("none.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no daemon is running"), "{err}");
}
