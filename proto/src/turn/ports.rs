//! The relayed-port pool: which relayed transport addresses exist, which are taken, and the
//! tenant quotas — allocations per username and per network, and the per-network bandwidth
//! bucket every allocation of a network shares. A driver wraps it in its [`RelayAllocator`]
//! (binding sockets); one pool serves every worker of a process (behind the driver's mutex,
//! taken on Allocate and release only), so the quotas hold across `SO_REUSEPORT` workers.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

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

/// A reserved relayed address and what its allocation shares with the rest of its network.
#[derive(Debug, Clone)]
pub struct Reservation {
    /// The relayed transport address.
    pub relayed: SocketAddr,
    /// The network's bandwidth bucket (`None`: no per-network limit).
    pub network_rate: Option<Arc<SharedRate>>,
}

impl Reservation {
    /// A reservation without a network bucket.
    pub fn plain(relayed: SocketAddr) -> Reservation {
        Reservation {
            relayed,
            network_rate: None,
        }
    }
}

/// Reserves relayed transport addresses; implemented by the driver (which binds sockets).
pub trait RelayAllocator {
    /// Reserves a relayed address of `family` for `tenant` (quota keys) asked for by `client`;
    /// `even_port` asks for an even port number (EVEN-PORT without reservation, RFC 8656 §14.6).
    fn allocate(
        &mut self,
        client: SocketAddr,
        tenant: &Tenant,
        family: Family,
        even_port: bool,
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
    /// order; `try_bind` returns true when the address was usable (e.g. the socket bound).
    pub fn reserve(
        &mut self,
        tenant: &Tenant,
        family: Family,
        even_port: bool,
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
        // Bounded scan: at most `total` candidates, and at most 64 failed binds in a row
        // (ports taken by other programs) before reporting capacity.
        let mut failed_binds = 0;
        for _ in 0..total {
            let i = self.next % total;
            self.next = self.next.wrapping_add(1);
            let port = self.lo + (i % ports) as u16;
            let addr = SocketAddr::new(ips[i / ports], port);
            if self.in_use.contains(&addr) || (even_port && port % 2 == 1) {
                continue;
            }
            if try_bind(addr) {
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
                return Ok(Reservation {
                    relayed: addr,
                    network_rate: net.rate.clone(),
                });
            }
            failed_binds += 1;
            if failed_binds >= 64 {
                break;
            }
        }
        Err(AllocateError::Capacity)
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
        even_port: bool,
        now: Instant,
    ) -> Result<Reservation, AllocateError> {
        self.reserve(tenant, family, even_port, now, |_| true)
    }
    fn release(&mut self, relayed: SocketAddr, tenant: &Tenant) {
        PortPool::release(self, relayed, tenant)
    }
    fn is_live_relayed(&self, addr: SocketAddr) -> bool {
        self.is_in_use(addr)
    }
}
