//! `--dev` writes its secrets (connect string, dev token) readable by the owner only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use meshpunch_rendezvous::config::Config;
use meshpunch_rendezvous::server::Server;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn dev_connect_file_and_token_are_0600() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Config::loopback(dir.path())).await.unwrap();
    let cs = server.dev_connect().unwrap().to_string();
    let connect = dir.path().join("connect");
    assert_eq!(std::fs::read_to_string(&connect).unwrap().trim(), cs);
    assert_eq!(mode(&connect), 0o600, "connect holds the dev token");
    assert_eq!(mode(&dir.path().join("dev-token")), 0o600);
}

#[tokio::test]
async fn a_world_readable_or_symlinked_connect_file_is_replaced_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let connect = dir.path().join("connect");
    // Left world-readable by an older version.
    std::fs::write(&connect, "old\n").unwrap();
    std::fs::set_permissions(&connect, std::fs::Permissions::from_mode(0o644)).unwrap();
    let server = Server::start(Config::loopback(dir.path())).await.unwrap();
    assert_eq!(mode(&connect), 0o600);
    drop(server);

    // A symlink planted where the connect file goes is replaced, its target untouched.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "untouched\n").unwrap();
    std::fs::remove_file(&connect).unwrap();
    std::os::unix::fs::symlink(&victim, &connect).unwrap();
    let server = Server::start(Config::loopback(dir.path())).await.unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched\n");
    assert!(std::fs::symlink_metadata(&connect).unwrap().is_file());
    assert_eq!(mode(&connect), 0o600);
    drop(server);
}
