//! The admin HTTP server under attack: a stalled request is closed within 10 s, a silent
//! connection too, and connections beyond the cap are closed at once (with a metric).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshpunch_relay::{admin, Relay};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

async fn get(admin: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(common::T, s.read_to_string(&mut out)).await;
    out
}

fn counter(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_admin_requests_are_closed_and_connections_capped() {
    let relay = Relay::start(common::relay_config(false, 7)).unwrap();
    let handle = admin::install_recorder();
    let admin = admin::serve("127.0.0.1:0".parse().unwrap(), handle, relay.control())
        .await
        .unwrap();
    assert!(get(admin, "/healthz").await.starts_with("HTTP/1.1 200"));

    // Half a request line, then nothing: closed within 10 s.
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metr").await.unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(10)).await,
        "stalled admin request still open after 10 s"
    );
    eprintln!("stalled request closed after {:?}", started.elapsed());

    // A connection that sends nothing is closed too.
    let mut idle = TcpStream::connect(admin).await.unwrap();
    assert!(closed_within(&mut idle, Duration::from_secs(10)).await);

    // The cap: 64 stalled connections fill it, the 65th is closed at once.
    let mut stalled = Vec::new();
    for _ in 0..admin::MAX_CONNECTIONS {
        let mut s = TcpStream::connect(admin).await.unwrap();
        s.write_all(b"GET /").await.unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(admin).await.unwrap();
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert!(
        closed_within(&mut extra, Duration::from_secs(2)).await,
        "connection over the cap was served"
    );
    drop(stalled);
    let text = tokio::time::timeout(common::T * 2, async {
        loop {
            let out = get(admin, "/metrics").await;
            if out.starts_with("HTTP/1.1 200") {
                return out;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap();
    assert!(
        counter(
            &text,
            "meshpunch_relay_admin_refused_total{reason=\"too_many_connections\"}"
        ) >= 1
    );
    assert!(
        counter(
            &text,
            "meshpunch_relay_admin_refused_total{reason=\"header_timeout\"}"
        ) >= 1
    );
    relay.control().stop();
}
