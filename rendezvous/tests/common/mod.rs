//! Helpers shared by the rendezvous integration tests.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::time::Duration;

use meshpunch_proto::connect::ConnectString;
use meshpunch_proto::wire::{self, FrameDecoder, Message, PeerKey};
use meshpunch_rendezvous::{Config, Server};
use x25519_dalek::{PublicKey, StaticSecret};

pub use meshpunch::rendezvous as client;

/// Generous bound for anything that should happen "soon" on a loaded machine.
pub const SOON: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

pub async fn start(dir: &std::path::Path) -> Server {
    init_tracing();
    Server::start(Config::loopback(dir))
        .await
        .expect("server starts")
}

pub fn key() -> (StaticSecret, PeerKey) {
    let sk = StaticSecret::random_from_rng(rand::rngs::OsRng);
    let pk = PeerKey::from(PublicKey::from(&sk));
    (sk, pk)
}

pub async fn connect(
    cs: &ConnectString,
) -> (client::Client, client::Events, StaticSecret, PeerKey) {
    let (sk, pk) = key();
    let (c, ev) = tokio::time::timeout(
        SOON,
        client::Client::connect(client::ClientConfig::new(cs.clone(), sk.clone())),
    )
    .await
    .expect("connect in time")
    .expect("connect ok");
    (c, ev, sk, pk)
}

/// Waits for the first event matching `f`.
pub async fn wait_for<T>(
    ev: &mut client::Events,
    mut f: impl FnMut(client::Event) -> Option<T>,
) -> T {
    tokio::time::timeout(SOON, async {
        loop {
            let e = ev.recv().await.expect("event stream open");
            if let Some(t) = f(e) {
                return t;
            }
        }
    })
    .await
    .expect("event in time")
}

/// A raw protocol connection, for tests that misbehave on purpose.
pub struct Raw {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub dec: FrameDecoder,
    _ep: quinn::Endpoint,
}

impl Raw {
    pub async fn connect(cs: &ConnectString) -> Raw {
        Raw::connect_from(cs, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Like [`Raw::connect`], from the local address `local`.
    pub async fn connect_from(cs: &ConnectString, local: std::net::SocketAddr) -> Raw {
        let cfg = client::quic_client_config(cs.pin).unwrap();
        let ep = quinn::Endpoint::client(local).unwrap();
        let addr = format!("{}:{}", cs.host, cs.port).parse().unwrap();
        let conn = ep
            .connect_with(cfg, addr, "meshpunch")
            .unwrap()
            .await
            .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        Raw {
            conn,
            send,
            recv,
            dec: FrameDecoder::new(wire::MAX_FRAME_LEN),
            _ep: ep,
        }
    }

    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self._ep
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        self.send.write_all(b).await.unwrap();
    }

    pub async fn send(&mut self, m: &Message) {
        self.send_bytes(&m.encode()).await;
    }

    /// Next message, or `None` when the stream ends.
    pub async fn recv(&mut self) -> Option<Message> {
        let mut buf = [0u8; 4096];
        tokio::time::timeout(SOON, async {
            loop {
                if let Some(m) = self.dec.next_message().unwrap() {
                    return Some(m);
                }
                match self.recv.read(&mut buf).await {
                    Ok(Some(n)) => self.dec.push(&buf[..n]),
                    _ => return None,
                }
            }
        })
        .await
        .expect("message in time")
    }

    /// Runs hello + challenge + proof with `sk`, returning the server's answer to the proof.
    pub async fn register(&mut self, token: &str, sk: &StaticSecret) -> Message {
        let pk = PeerKey::from(PublicKey::from(sk));
        self.send(&Message::Hello(wire::Hello {
            token: token.into(),
            key: pk,
            software: "test".into(),
        }))
        .await;
        let Some(Message::Challenge(ch)) = self.recv().await else {
            panic!("expected challenge")
        };
        let mut exporter = [0u8; wire::EXPORTER_LEN];
        self.conn
            .export_keying_material(&mut exporter, wire::EXPORTER_LABEL, b"")
            .unwrap();
        let dh = sk
            .diffie_hellman(&PublicKey::from(ch.server_ephemeral))
            .to_bytes();
        let mac = wire::key_proof(&dh, &exporter, &ch.nonce, &pk, &ch.server_ephemeral);
        self.send(&Message::KeyProof(wire::KeyProof { mac })).await;
        self.recv().await.expect("answer to proof")
    }
}
