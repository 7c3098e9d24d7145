//! The daemon's local attack surface: who can reach the control socket, how much a connection
//! can make it buffer, how many connections it serves, and the key-file warning.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshpunch::control::{self, CtlCmd, MAX_CONNECTIONS};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(10);

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// An engine that answers every debug request with success.
fn engine() -> mpsc::Sender<CtlCmd> {
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            if let CtlCmd::Debug { reply, .. } = cmd {
                let _ = reply.send(Ok(()));
            }
        }
    });
    tx
}

const DEBUG_REQ: &[u8] =
    b"{\"cmd\":\"debug\",\"peer\":\"p\",\"knob\":\"block-direct\",\"on\":true}\n";

/// Sends a debug request on `s` and returns the answer line.
async fn ask(s: &mut BufReader<UnixStream>) -> String {
    s.get_mut().write_all(DEBUG_REQ).await.unwrap();
    let mut line = String::new();
    tokio::time::timeout(T, s.read_line(&mut line))
        .await
        .expect("answer in time")
        .unwrap();
    line
}

async fn connect(p: &Path) -> BufReader<UnixStream> {
    BufReader::new(UnixStream::connect(p).await.unwrap())
}

fn sock_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("meshpunch.sock")
}

#[tokio::test]
async fn control_socket_is_0600_and_its_new_directory_0700_with_umask_000() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/meshpunch.sock");
    // SAFETY: umask has no preconditions; restored right after the bind.
    let old = unsafe { libc::umask(0) };
    let served = control::serve(path.clone(), engine()).await;
    unsafe { libc::umask(old) };
    served.unwrap();
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1
    );
    assert!(ask(&mut connect(&path).await).await.contains("\"ok\":true"));
}

#[tokio::test]
async fn control_socket_in_a_world_writable_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = control::serve(sock_in(&dir), engine()).await.unwrap_err();
    assert!(e.to_string().contains("world-writable"), "{e}");
}

#[tokio::test]
async fn a_file_that_is_not_a_socket_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_in(&dir);
    std::fs::write(&path, "precious").unwrap();
    let e = control::serve(path.clone(), engine()).await.unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_uid_is_refused_with_a_clear_message() {
    let test = "another_uid_is_refused_with_a_clear_message";
    if !natlab::testenv::require_root(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = sock_in(&dir);
    let server = control::bind(&path).await.unwrap();
    let counters = server.counters();
    server.spawn(engine());
    // As a careless admin would: the socket mode alone no longer keeps `nobody` out.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let run_as = |uid: Option<u32>| {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshpunch"));
            cmd.arg("--control-socket")
                .arg(&path)
                .args(["debug", "block-direct", "p", "on"])
                .env("RUST_LOG", "off");
            if let Some(uid) = uid {
                cmd.uid(uid).gid(uid);
            }
            cmd.output().unwrap()
        })
    };
    let nobody = run_as(Some(65534)).await.unwrap();
    let err = String::from_utf8_lossy(&nobody.stderr);
    assert!(!nobody.status.success(), "uid 65534 was served: {err}");
    assert!(
        err.contains("permission denied") && err.contains("uid 65534"),
        "{err}"
    );
    assert_eq!(
        counters
            .refused_uid
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let root = run_as(None).await.unwrap();
    assert!(
        root.status.success(),
        "{}",
        String::from_utf8_lossy(&root.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2_mib_line_without_newline_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_in(&dir);
    control::serve(path.clone(), engine()).await.unwrap();
    let mut bad = connect(&path).await;
    let mut good = connect(&path).await;
    let (mut r, mut w) = bad.into_inner().into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..32 {
            if w.write_all(&chunk).await.is_err() {
                break;
            }
        }
        w
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(T, r.read_to_end(&mut answer))
        .await
        .expect("the oversized connection is closed, not left buffering");
    // The daemon answers with an error line and closes; with our unread bytes still queued
    // the kernel may turn that close into a reset, which ends the connection all the same.
    match read {
        Ok(_) => {
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.contains("request line longer than"), "{answer}");
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    drop(writer);
    // The daemon still serves others.
    assert!(ask(&mut good).await.contains("\"ok\":true"));
    assert!(ask(&mut connect(&path).await).await.contains("\"ok\":true"));
    bad = connect(&path).await;
    assert!(ask(&mut bad).await.contains("\"ok\":true"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused_and_slots_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock_in(&dir);
    control::serve(path.clone(), engine()).await.unwrap();
    let mut open = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut c = connect(&path).await;
        assert!(ask(&mut c).await.contains("\"ok\":true"));
        open.push(c);
    }
    let mut extra = connect(&path).await;
    let mut line = String::new();
    tokio::time::timeout(T, extra.read_line(&mut line))
        .await
        .expect("refused at once")
        .unwrap();
    assert!(line.contains("too many control connections"), "{line}");
    drop(open.pop());
    // The slot is released when the handler sees the close; retry briefly.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let mut c = connect(&path).await;
        // Refused while the slot is still taken: the write may fail, the read sees the refusal.
        let _ = c.get_mut().write_all(DEBUG_REQ).await;
        let mut line = String::new();
        let _ = tokio::time::timeout(T, c.read_line(&mut line)).await;
        if line.contains("\"ok\":true") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn up_warns_like_wg_when_the_key_file_is_world_readable() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mesh.conf");
    let key = meshpunch::keys::format_key(&meshpunch::keys::generate_private());
    let peer = meshpunch::keys::format_key(&meshpunch::keys::generate_private());
    // No rendezvous and no candidates: `up` stops right after reading the file.
    std::fs::write(
        &conf,
        format!("[Interface]\nPrivateKey = {key}\n\n[Peer]\nPublicKey = {peer}\n"),
    )
    .unwrap();
    let up = |m: u32| {
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(m)).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_meshpunch"))
            .arg("up")
            .arg("--config")
            .arg(&conf)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = up(0o644);
    assert!(
        err.contains(&format!(
            "Warning: `{}' is world accessible",
            conf.display()
        )),
        "{err}"
    );
    assert!(!up(0o600).contains("Warning"));
}
