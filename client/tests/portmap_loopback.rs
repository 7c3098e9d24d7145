//! The port-mapping driver over real sockets on loopback against a scripted PCP gateway that
//! mixes hostile answers (another nonce, a private external address, another source) with the
//! genuine one: only the genuine one maps, the others are counted per reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use meshpunch::portmap::{Options, PortMapper};
use meshpunch_proto::portmap::{pcp, SERVER_PORT};
use tokio::net::UdpSocket;

fn map_answer(req: &[u8], nonce: pcp::Nonce, ext: Ipv4Addr, port: u16) -> Vec<u8> {
    let internal = u16::from_be_bytes([req[40], req[41]]);
    pcp::encode_response(&pcp::Response {
        opcode: pcp::OP_MAP,
        result: pcp::ResultCode::Success,
        lifetime: 7200,
        epoch: 100,
        map: Some(pcp::MapData {
            nonce,
            protocol: 17,
            internal_port: internal,
            external_port: port,
            external_ip: IpAddr::V4(ext),
        }),
    })
}

#[tokio::test]
async fn hostile_pcp_answers_are_ignored_and_counted_and_the_genuine_one_maps() {
    // A gateway address of our own on loopback (127.0.0.0/8 is all local), port 5351.
    let gw_ip = Ipv4Addr::new(127, 53, 51, 1 + (std::process::id() % 200) as u8);
    let gw = match UdpSocket::bind((gw_ip, SERVER_PORT)).await {
        Ok(s) => s,
        Err(e) => panic!("bind {gw_ip}:{SERVER_PORT}: {e}"),
    };
    let imposter = UdpSocket::bind((Ipv4Addr::new(127, 53, 52, 1), 0))
        .await
        .unwrap();
    let m = PortMapper::start(
        IpAddr::V4(gw_ip),
        41641,
        Options {
            upnp: false,
            ..Options::default()
        },
    )
    .unwrap();
    let mut buf = [0u8; 1100];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut mapped = false;
    while !mapped {
        let (n, from) = tokio::time::timeout_at(deadline, gw.recv_from(&mut buf))
            .await
            .expect("requests in time")
            .unwrap();
        let req = buf[..n].to_vec();
        match (req[0], req[1]) {
            (2, pcp::OP_ANNOUNCE) => {
                let a = pcp::encode_response(&pcp::Response {
                    opcode: pcp::OP_ANNOUNCE,
                    result: pcp::ResultCode::Success,
                    lifetime: 0,
                    epoch: 100,
                    map: None,
                });
                gw.send_to(&a, from).await.unwrap();
            }
            (2, pcp::OP_MAP) => {
                let nonce: pcp::Nonce = req[24..36].try_into().unwrap();
                let public = Ipv4Addr::new(198, 51, 100, 2);
                let mut other = nonce;
                other[0] ^= 1;
                // Another nonce, a private external address, another source: all ignored.
                gw.send_to(&map_answer(&req, other, public, 1111), from)
                    .await
                    .unwrap();
                gw.send_to(
                    &map_answer(&req, nonce, Ipv4Addr::new(10, 0, 0, 1), 2222),
                    from,
                )
                .await
                .unwrap();
                imposter
                    .send_to(&map_answer(&req, nonce, public, 3333), from)
                    .await
                    .unwrap();
                gw.send_to(b"\x02\x81garbage", from).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
                // The genuine answer.
                gw.send_to(&map_answer(&req, nonce, public, 60001), from)
                    .await
                    .unwrap();
                mapped = true;
            }
            // NAT-PMP: this gateway speaks PCP only.
            _ => {}
        }
    }
    let s = m.settled(Duration::from_secs(5)).await;
    assert_eq!(
        s.report.mapped,
        Some(SocketAddr::from(([198, 51, 100, 2], 60001))),
        "{s:?}"
    );
    assert!(s.report.pcp && !s.report.upnp, "{s:?}");
    for reason in [
        "wrong_nonce",
        "private_external",
        "not_gateway",
        "malformed",
    ] {
        assert_eq!(s.ignored.get(reason), Some(&1), "{reason}: {s:?}");
    }
    // Stop deletes: a MAP with lifetime 0 and our nonce reaches the gateway.
    let stop = tokio::spawn(m.stop());
    // (NAT-PMP probe retransmissions may still be queued before it.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let (n, _) = tokio::time::timeout_at(deadline, gw.recv_from(&mut buf))
            .await
            .expect("delete in time")
            .unwrap();
        if n == 60 {
            break;
        }
        assert_eq!(
            &buf[..n],
            &[0, 0],
            "only NAT-PMP probes besides the deletion"
        );
    }
    assert_eq!((buf[0], buf[1]), (2, pcp::OP_MAP));
    assert_eq!(&buf[4..8], &[0, 0, 0, 0], "lifetime 0");
    stop.await.unwrap();
}
