//! The relayed-port pool: which relayed transport addresses exist, which are taken, and the
//! tenant quotas — allocations per username and per network, and the per-network bandwidth
//! bucket every allocation of a network shares. A driver wraps it in its [`RelayAllocator`]
//! (binding sockets); one pool serves every worker of a process (behind the driver's mutex,
//! taken on Allocate and release only), so the quotas hold across `SO_REUSEPORT` workers.
//!
//! The pool also holds the RFC 8656 §7.2 port reservations (EVEN-PORT with the R bit: the
//! next-higher port is kept for [`RESERVATION_LIFETIME`] under a RESERVATION-TOKEN), so the
//! second Allocate finds it whichever worker gets it, and remembers ports another program holds
//! on the host ([`BUSY_RETRY`]): such a port is skipped and the next one tried, so a busy host
//! never makes the relay look full while its pool has free ports.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::limits::{Rate, SharedRate};
use super::Family;
use crate::creds::Tenant;

/// Why a relayed address could not be reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllocateError {
    /// The username holds as many allocations as allowed (486).
    #[error("allocation quota of the username reached")]
    Quota,
    /// The network holds as many allocations as allowed (486).
    #[error("allocation quota of the network reached")]
    NetworkQuota,
    /// No relayed port is free (508).
    #[error("no relayed port free")]
    Capacity,
    /// The relay has no address of the requested family (440).
    #[error("address family not supported")]
    Family,
}

/// How long a port reserved by EVEN-PORT with the R bit stays reserved for its
/// RESERVATION-TOKEN (RFC 8656 §7.2 suggests 30 seconds).
pub const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);

/// How long a relayed port that failed to bind (another program holds it on the host) is
/// skipped before it is tried again.
pub const BUSY_RETRY: Duration = Duration::from_secs(30);

/// Size of a RESERVATION-TOKEN (RFC 8656 §14.9).
pub const RESERVATION_TOKEN_LEN: usize = 8;

/// Which relayed port an Allocate asks for (RFC 8656 §7.2, §14.6, §14.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortRequest {
    /// Any port.
    Any,
    /// EVEN-PORT without the R bit: an even port.
    Even,
    /// EVEN-PORT with the R bit: an even port P, and P+1 reserved under a token.
    EvenReserveNext,
    /// RESERVATION-TOKEN: the port reserved earlier under this token.
    Token([u8; RESERVATION_TOKEN_LEN]),
}

/// A reserved relayed address and what its allocation shares with the rest of its network.
#[derive(Debug, Clone)]
pub struct Reservation {
    /// The relayed transport address.
    pub relayed: SocketAddr,
    /// The network's bandwidth bucket (`None`: no per-network limit).
    pub network_rate: Option<Arc<SharedRate>>,
    /// With [`PortRequest::EvenReserveNext`]: the token and the next-higher address it
    /// reserves (the driver keeps that address's socket until the token is redeemed or
    /// [`PortPool::expire_reservations`] returns it).
    pub reserved_next: Option<([u8; RESERVATION_TOKEN_LEN], SocketAddr)>,
}

impl Reservation {
    /// A reservation without a network bucket.
    pub fn plain(relayed: SocketAddr) -> Reservation {
        Reservation {
            relayed,
            network_rate: None,
            reserved_next: None,
        }
    }
}

/// Reserves relayed transport addresses; implemented by the driver (which binds sockets).
pub trait RelayAllocator {
    /// Reserves a relayed address of `family` for `tenant` (quota keys) asked for by `client`;
    /// `port` says which port (any, even, even with the next reserved, a reservation token).
    fn allocate(
        &mut self,
        client: SocketAddr,
        tenant: &Tenant,
        family: Family,
        port: PortRequest,
        now: Instant,
    ) -> Result<Reservation, AllocateError>;
    /// Returns an address reserved by [`RelayAllocator::allocate`].
    fn release(&mut self, relayed: SocketAddr, tenant: &Tenant);
    /// Whether `addr` (a bound relay IP and port) is the relayed address of a live allocation
    /// of this relay, in any worker: the only own addresses a client may relay to.
    fn is_live_relayed(&self, addr: SocketAddr) -> bool;
}

#[derive(Debug, Clone)]
struct NetworkEntry {
    allocations: u32,
    rate: Option<Arc<SharedRate>>,
}

/// A reusable port pool + tenant quotas: the decision logic a driver's allocator wraps.
#[derive(Debug, Clone)]
pub struct PortPool {
    ips: Vec<IpAddr>,
    lo: u16,
    hi: u16,
    next: usize,
    in_use: HashSet<SocketAddr>,
    per_user: HashMap<String, u32>,
    per_network: HashMap<String, NetworkEntry>,
    /// RESERVATION-TOKEN → reserved address and when the reservation ends.
    tokens: HashMap<[u8; RESERVATION_TOKEN_LEN], (SocketAddr, Instant)>,
    /// Addresses held by a token (not handed out to anyone else meanwhile).
    reserved: HashSet<SocketAddr>,
    /// Addresses that failed to bind (busy on the host) → when to try them again.
    busy: HashMap<SocketAddr, Instant>,
    rng: u64,
    /// Allocations one username may hold at once (0 = unlimited).
    pub user_quota: u32,
    /// Allocations one network may hold at once over all its usernames (0 = unlimited).
    pub network_quota: u32,
    /// Bandwidth of one network over all its allocations, both directions, bytes per second
    /// (`per_sec` 0 = unlimited).
    pub network_rate: Rate,
}

impl PortPool {
    /// A pool over `ips` × `lo..=hi` with a per-username quota and no network limits (set
    /// `network_quota` / `network_rate`, or use [`PortPool::with_network_limits`]).
    pub fn new(ips: Vec<IpAddr>, lo: u16, hi: u16, user_quota: u32) -> Self {
        PortPool {
            ips,
            lo: lo.min(hi),
            hi: hi.max(lo),
            next: 0,
            in_use: HashSet::new(),
            per_user: HashMap::new(),
            per_network: HashMap::new(),
            tokens: HashMap::new(),
            reserved: HashSet::new(),
            busy: HashMap::new(),
            rng: 0x9E37_79B9_7F4A_7C15,
            user_quota,
            network_quota: 0,
            network_rate: Rate::UNLIMITED,
        }
    }

    /// Sets the per-network allocation quota and bandwidth.
    pub fn with_network_limits(mut self, quota: u32, rate: Rate) -> Self {
        self.network_quota = quota;
        self.network_rate = rate;
        self
    }

    /// Seeds the generator of RESERVATION-TOKENs (the driver passes OS randomness: a token
    /// another client could guess would let it take the reserved port).
    pub fn with_token_seed(mut self, seed: u64) -> Self {
        self.rng = seed | 1;
        self
    }

    /// Ends reservations whose time is up and returns their addresses (the driver closes the
    /// sockets it kept for them).
    pub fn expire_reservations(&mut self, now: Instant) -> Vec<SocketAddr> {
        let mut gone = Vec::new();
        self.tokens.retain(|_, (addr, until)| {
            if *until <= now {
                gone.push(*addr);
                false
            } else {
                true
            }
        });
        for a in &gone {
            self.reserved.remove(a);
        }
        self.busy.retain(|_, until| *until > now);
        gone
    }

    /// Addresses reserved under a token right now.
    pub fn reserved(&self) -> usize {
        self.reserved.len()
    }

    /// Number of relayed addresses the pool can hand out (its capacity limit).
    pub fn capacity(&self) -> usize {
        self.ips.len() * (usize::from(self.hi - self.lo) + 1)
    }

    /// Addresses currently handed out.
    pub fn in_use(&self) -> usize {
        self.in_use.len()
    }

    /// Whether `addr` is handed out.
    pub fn is_in_use(&self, addr: SocketAddr) -> bool {
        self.in_use.contains(&addr)
    }

    /// Allocations `tenant`'s network holds.
    pub fn network_allocations(&self, tenant: &Tenant) -> u32 {
        self.per_network
            .get(&tenant.network)
            .map_or(0, |n| n.allocations)
    }

    /// Checks the quotas of `tenant` and yields candidate addresses of `family` in round-robin
    /// order; `try_bind` returns true when the address was usable (e.g. the socket bound). An
    /// address that fails is remembered as busy on the host for [`BUSY_RETRY`] and the scan
    /// goes on: only a pool with no usable address left answers [`AllocateError::Capacity`].
    /// With [`PortRequest::EvenReserveNext`], `try_bind` is also called for the next-higher
    /// port, which is then reserved under the returned token.
    pub fn reserve(
        &mut self,
        tenant: &Tenant,
        family: Family,
        port: PortRequest,
        now: Instant,
        mut try_bind: impl FnMut(SocketAddr) -> bool,
    ) -> Result<Reservation, AllocateError> {
        if self.user_quota > 0
            && self.per_user.get(&tenant.user).copied().unwrap_or(0) >= self.user_quota
        {
            return Err(AllocateError::Quota);
        }
        if self.network_quota > 0 && self.network_allocations(tenant) >= self.network_quota {
            return Err(AllocateError::NetworkQuota);
        }
        // Reservations and busy marks whose time is up are dropped lazily; the driver also
        // calls `expire_reservations` to close the sockets it kept.
        if let PortRequest::Token(token) = port {
            let addr = match self.tokens.get(&token) {
                Some((addr, until)) if *until > now => *addr,
                _ => return Err(AllocateError::Capacity),
            };
            // The family is the reserved address's (RFC 8656 §7.2: no REQUESTED-ADDRESS-FAMILY
            // beside a token).
            self.tokens.remove(&token);
            self.reserved.remove(&addr);
            if self.in_use.contains(&addr) || !try_bind(addr) {
                return Err(AllocateError::Capacity);
            }
            return Ok(self.take(addr, tenant, now, None));
        }
        let ips: Vec<IpAddr> = self
            .ips
            .iter()
            .copied()
            .filter(|ip| Family::of(*ip) == family)
            .collect();
        if ips.is_empty() {
            return Err(AllocateError::Family);
        }
        let ports = usize::from(self.hi - self.lo) + 1;
        let total = ports * ips.len();
        let even = matches!(port, PortRequest::Even | PortRequest::EvenReserveNext);
        let pair = port == PortRequest::EvenReserveNext;
        // Bounded scan: every candidate at most once.
        for _ in 0..total {
            let i = self.next % total;
            self.next = self.next.wrapping_add(1);
            let p = self.lo + (i % ports) as u16;
            let addr = SocketAddr::new(ips[i / ports], p);
            if (even && p % 2 == 1) || !self.free(addr, now) {
                continue;
            }
            let next = if pair {
                if p >= self.hi {
                    continue;
                }
                let next = SocketAddr::new(addr.ip(), p + 1);
                if !self.free(next, now) {
                    continue;
                }
                Some(next)
            } else {
                None
            };
            if !try_bind(addr) {
                self.busy.insert(addr, now + BUSY_RETRY);
                continue;
            }
            let token = match next {
                Some(next) => {
                    if !try_bind(next) {
                        // `addr` bound, its neighbour is busy: try another pair (the driver
                        // drops the socket it bound for `addr`).
                        self.busy.insert(next, now + BUSY_RETRY);
                        continue;
                    }
                    let token = self.new_token();
                    self.tokens
                        .insert(token, (next, now + RESERVATION_LIFETIME));
                    self.reserved.insert(next);
                    Some((token, next))
                }
                None => None,
            };
            return Ok(self.take(addr, tenant, now, token));
        }
        Err(AllocateError::Capacity)
    }

    /// Whether `addr` may be handed out now (not in use, not reserved, not known busy).
    fn free(&self, addr: SocketAddr, now: Instant) -> bool {
        !self.in_use.contains(&addr)
            && !self.reserved.contains(&addr)
            && self.busy.get(&addr).is_none_or(|until| *until <= now)
    }

    fn new_token(&mut self) -> [u8; RESERVATION_TOKEN_LEN] {
        loop {
            let t = crate::rng::xorshift64star(&mut self.rng).to_be_bytes();
            if !self.tokens.contains_key(&t) {
                return t;
            }
        }
    }

    fn take(
        &mut self,
        addr: SocketAddr,
        tenant: &Tenant,
        now: Instant,
        reserved_next: Option<([u8; RESERVATION_TOKEN_LEN], SocketAddr)>,
    ) -> Reservation {
        self.busy.remove(&addr);
        self.in_use.insert(addr);
        *self.per_user.entry(tenant.user.clone()).or_insert(0) += 1;
        let rate = self.network_rate;
        let net = self
            .per_network
            .entry(tenant.network.clone())
            .or_insert_with(|| NetworkEntry {
                allocations: 0,
                rate: (rate.per_sec > 0).then(|| Arc::new(SharedRate::new(rate, now))),
            });
        net.allocations += 1;
        Reservation {
            relayed: addr,
            network_rate: net.rate.clone(),
            reserved_next,
        }
    }

    /// Returns an address to the pool.
    pub fn release(&mut self, relayed: SocketAddr, tenant: &Tenant) {
        if self.in_use.remove(&relayed) {
            if let Some(n) = self.per_user.get_mut(&tenant.user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_user.remove(&tenant.user);
                }
            }
            if let Some(n) = self.per_network.get_mut(&tenant.network) {
                n.allocations = n.allocations.saturating_sub(1);
                if n.allocations == 0 {
                    self.per_network.remove(&tenant.network);
                }
            }
        }
    }
}

impl RelayAllocator for PortPool {
    fn allocate(
        &mut self,
        _client: SocketAddr,
        tenant: &Tenant,
        family: Family,
        port: PortRequest,
        now: Instant,
    ) -> Result<Reservation, AllocateError> {
        self.reserve(tenant, family, port, now, |_| true)
    }
    fn release(&mut self, relayed: SocketAddr, tenant: &Tenant) {
        PortPool::release(self, relayed, tenant)
    }
    fn is_live_relayed(&self, addr: SocketAddr) -> bool {
        self.is_in_use(addr)
    }
}
