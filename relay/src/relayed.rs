//! Binding relayed sockets out of the process-wide port pool: the one place every transport's
//! allocator (the UDP workers' and the TCP/TLS stream core's) reserves a relayed address, so
//! the quotas, the drain switch, busy host ports and the RFC 8656 §7.2 port reservations
//! (EVEN-PORT R bit / RESERVATION-TOKEN) behave the same whichever worker or transport asks.
//!
//! A port reserved under a token keeps its bound socket here, in [`Shared::reserved`], so no
//! other program can take it in the meantime; the Allocate that redeems the token, in whatever
//! worker, takes that socket. Reservations that time out are closed by [`expire`].

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::Instant;

use meshpunch_proto::creds::Tenant;
use meshpunch_proto::turn::{AllocateError, Family, PortRequest, Reservation};

use crate::worker::{udp_socket, Shared};

/// Reserves a relayed address for `tenant` and returns it with its bound (non-blocking)
/// socket. Refuses with [`AllocateError::Capacity`] while draining.
pub fn reserve_socket(
    shared: &Shared,
    tenant: &Tenant,
    family: Family,
    port: PortRequest,
    now: Instant,
) -> Result<(Reservation, UdpSocket), AllocateError> {
    if shared.draining.load(Ordering::Relaxed) {
        return Err(AllocateError::Capacity);
    }
    let buffer = shared.socket_buffer;
    let mut bound: Vec<(SocketAddr, UdpSocket)> = Vec::new();
    // Lock order: reserved sockets, then the pool (as in `expire`).
    let Ok(mut held) = shared.reserved.lock() else {
        return Err(AllocateError::Capacity);
    };
    let result = match shared.pool.lock() {
        Ok(mut pool) => {
            for gone in pool.expire_reservations(now) {
                held.remove(&gone);
            }
            pool.reserve(tenant, family, port, now, |addr| {
                if let Some(s) = held.remove(&addr) {
                    bound.push((addr, s));
                    return true;
                }
                match udp_socket(addr, false, buffer) {
                    Ok(s) => {
                        bound.push((addr, s));
                        true
                    }
                    Err(_) => false,
                }
            })
        }
        Err(_) => Err(AllocateError::Capacity),
    };
    let reservation = result.inspect_err(|e| {
        tracing::info!(user = %tenant.user, network = %tenant.network, error = %e, "allocation refused")
    })?;
    let mut sock = None;
    for (addr, s) in bound {
        if addr == reservation.relayed {
            sock = Some(s);
        } else if reservation
            .reserved_next
            .is_some_and(|(_, next)| next == addr)
        {
            held.insert(addr, s);
        }
        // Any other socket bound during the scan (a pair whose odd half was busy) closes here.
    }
    match sock {
        Some(s) => Ok((reservation, s)),
        None => Err(AllocateError::Capacity),
    }
}

/// Closes the sockets of reservations whose 30 s are up (called periodically by a worker).
pub fn expire(shared: &Shared, now: Instant) {
    let Ok(mut held) = shared.reserved.lock() else {
        return;
    };
    if let Ok(mut pool) = shared.pool.lock() {
        for gone in pool.expire_reservations(now) {
            held.remove(&gone);
        }
    }
}
