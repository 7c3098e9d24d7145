//! The relayed-port pool: which relayed transport addresses exist, which are taken, and the
//! per-user allocation quota. A driver wraps it in its [`RelayAllocator`] (binding sockets).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use super::Family;

/// Why a relayed address could not be reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllocateError {
    /// The user holds as many allocations as allowed (486).
    #[error("allocation quota reached")]
    Quota,
    /// No relayed port is free (508).
    #[error("no relayed port free")]
    Capacity,
    /// The relay has no address of the requested family (440).
    #[error("address family not supported")]
    Family,
}

/// Reserves relayed transport addresses; implemented by the driver (which binds sockets).
pub trait RelayAllocator {
    /// Reserves a relayed address of `family` for `user` (quota key) asked for by `client`;
    /// `even_port` asks for an even port number (EVEN-PORT without reservation, RFC 8656 §14.6).
    fn allocate(
        &mut self,
        client: SocketAddr,
        user: &str,
        family: Family,
        even_port: bool,
    ) -> Result<SocketAddr, AllocateError>;
    /// Returns an address reserved by [`RelayAllocator::allocate`].
    fn release(&mut self, relayed: SocketAddr, user: &str);
}

/// A reusable port pool + per-user quota: the decision logic a driver's allocator wraps.
#[derive(Debug, Clone)]
pub struct PortPool {
    ips: Vec<IpAddr>,
    lo: u16,
    hi: u16,
    next: usize,
    in_use: std::collections::HashSet<SocketAddr>,
    per_user: HashMap<String, u32>,
    /// Allocations one user may hold at once (0 = unlimited).
    pub user_quota: u32,
}

impl PortPool {
    /// A pool over `ips` × `lo..=hi`.
    pub fn new(ips: Vec<IpAddr>, lo: u16, hi: u16, user_quota: u32) -> Self {
        PortPool {
            ips,
            lo: lo.min(hi),
            hi: hi.max(lo),
            next: 0,
            in_use: Default::default(),
            per_user: HashMap::new(),
            user_quota,
        }
    }

    /// Number of relayed addresses the pool can hand out (its capacity limit).
    pub fn capacity(&self) -> usize {
        self.ips.len() * (usize::from(self.hi - self.lo) + 1)
    }

    /// Addresses currently handed out.
    pub fn in_use(&self) -> usize {
        self.in_use.len()
    }

    /// Checks the quota of `user` and yields candidate addresses of `family` in round-robin
    /// order; `try_bind` returns true when the address was usable (e.g. the socket bound).
    pub fn reserve(
        &mut self,
        user: &str,
        family: Family,
        even_port: bool,
        mut try_bind: impl FnMut(SocketAddr) -> bool,
    ) -> Result<SocketAddr, AllocateError> {
        if self.user_quota > 0 && self.per_user.get(user).copied().unwrap_or(0) >= self.user_quota {
            return Err(AllocateError::Quota);
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
                *self.per_user.entry(user.to_owned()).or_insert(0) += 1;
                return Ok(addr);
            }
            failed_binds += 1;
            if failed_binds >= 64 {
                break;
            }
        }
        Err(AllocateError::Capacity)
    }

    /// Returns an address to the pool.
    pub fn release(&mut self, relayed: SocketAddr, user: &str) {
        if self.in_use.remove(&relayed) {
            if let Some(n) = self.per_user.get_mut(user) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_user.remove(user);
                }
            }
        }
    }
}

impl RelayAllocator for PortPool {
    fn allocate(
        &mut self,
        _client: SocketAddr,
        user: &str,
        family: Family,
        even_port: bool,
    ) -> Result<SocketAddr, AllocateError> {
        self.reserve(user, family, even_port, |_| true)
    }
    fn release(&mut self, relayed: SocketAddr, user: &str) {
        PortPool::release(self, relayed, user)
    }
}
