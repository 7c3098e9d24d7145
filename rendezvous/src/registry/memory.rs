//! In-memory [`Registry`]: a single node, state in `DashMap`s. The embedded default.

use std::collections::HashSet;

use dashmap::DashMap;
use meshpunch_proto::wire::PeerKey;
use tokio::sync::mpsc;

use super::{
    tell_local_watchers, BoxFuture, ConnId, Delivery, Envelope, Health, Inbox, PeerId, Registry,
    RegistryError, RevocationList, INBOX_CAPACITY,
};

/// Single-node registry.
#[derive(Debug)]
pub struct MemoryRegistry {
    node_id: String,
    owners: DashMap<PeerId, ConnId>,
    /// watched peer → keys (same network) watching it.
    watchers: DashMap<PeerId, HashSet<PeerKey>>,
    /// watcher → keys it watches (to undo on re-watch / unregister).
    watching: DashMap<PeerId, Vec<PeerKey>>,
    inbox: mpsc::Sender<Envelope>,
    /// Shared revocation list (one node: shared with itself) and its version.
    revoked: std::sync::Mutex<(u64, HashSet<String>)>,
}

impl MemoryRegistry {
    /// A registry and the inbox of its (only) node.
    pub fn new(node_id: String) -> (Self, Inbox) {
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
        (
            MemoryRegistry {
                node_id,
                owners: DashMap::new(),
                watchers: DashMap::new(),
                watching: DashMap::new(),
                inbox: tx,
                revoked: std::sync::Mutex::new((0, HashSet::new())),
            },
            rx,
        )
    }

    /// Number of registered peers.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    /// True when no peer is registered.
    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    fn push(&self, to: PeerId, delivery: Delivery) -> Result<(), RegistryError> {
        self.inbox
            .try_send(Envelope { to, delivery })
            .map_err(|_| RegistryError::Overloaded)
    }

    fn notify_watchers(&self, peer: &PeerId, online: bool) {
        let watchers: Vec<PeerKey> = match self.watchers.get(peer) {
            Some(w) => w.iter().copied().collect(),
            None => return,
        };
        tell_local_watchers(&self.owners, watchers, peer, online, |to, d| {
            self.push(to, d)
        });
    }

    fn unwatch_all(&self, watcher: &PeerId) {
        if let Some((_, keys)) = self.watching.remove(watcher) {
            for k in keys {
                let watched = PeerId {
                    network: watcher.network.clone(),
                    key: k,
                };
                if let dashmap::Entry::Occupied(mut e) = self.watchers.entry(watched) {
                    e.get_mut().remove(&watcher.key);
                    if e.get().is_empty() {
                        e.remove();
                    }
                }
            }
        }
    }
}

impl Registry for MemoryRegistry {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn register<'a>(
        &'a self,
        peer: &'a PeerId,
        conn: ConnId,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            let previous = self.owners.insert(peer.clone(), conn);
            match previous {
                Some(old) if old != conn => {
                    self.push(peer.clone(), Delivery::Superseded { conn: old })?;
                }
                Some(_) => {}
                None => self.notify_watchers(peer, true),
            }
            Ok(())
        })
    }

    fn unregister<'a>(
        &'a self,
        peer: &'a PeerId,
        conn: ConnId,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            let removed = self.owners.remove_if(peer, |_, owner| *owner == conn);
            if removed.is_some() {
                self.unwatch_all(peer);
                self.notify_watchers(peer, false);
            }
            Ok(())
        })
    }

    fn refresh<'a>(
        &'a self,
        _peer: &'a PeerId,
        _conn: ConnId,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async { Ok(()) })
    }

    fn is_online<'a>(&'a self, peer: &'a PeerId) -> BoxFuture<'a, Result<bool, RegistryError>> {
        Box::pin(async move { Ok(self.owners.contains_key(peer)) })
    }

    fn deliver<'a>(
        &'a self,
        to: &'a PeerId,
        delivery: Delivery,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            if !self.owners.contains_key(to) {
                return Err(RegistryError::NotFound);
            }
            self.push(to.clone(), delivery)
        })
    }

    fn watch<'a>(
        &'a self,
        watcher: &'a PeerId,
        keys: &'a [PeerKey],
    ) -> BoxFuture<'a, Result<Vec<(PeerKey, bool)>, RegistryError>> {
        Box::pin(async move {
            self.unwatch_all(watcher);
            let mut unique: Vec<PeerKey> = keys.to_vec();
            unique.sort();
            unique.dedup();
            let mut states = Vec::with_capacity(unique.len());
            for k in &unique {
                let watched = PeerId {
                    network: watcher.network.clone(),
                    key: *k,
                };
                states.push((*k, self.owners.contains_key(&watched)));
                self.watchers
                    .entry(watched)
                    .or_default()
                    .insert(watcher.key);
            }
            self.watching.insert(watcher.clone(), unique);
            Ok(states)
        })
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(async {
            Health {
                ready: true,
                detail: "memory".to_string(),
            }
        })
    }

    fn revoke<'a>(&'a self, hash: &'a str) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            if !super::is_revocation_hash(hash) {
                return Err(RegistryError::Unavailable(format!(
                    "not a token hash: {hash:?}"
                )));
            }
            let mut g = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
            if g.1.insert(hash.to_string()) {
                g.0 += 1;
            }
            Ok(())
        })
    }

    fn revocations(
        &self,
        known: u64,
    ) -> BoxFuture<'_, Result<Option<RevocationList>, RegistryError>> {
        Box::pin(async move {
            let g = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
            Ok((g.0 != known).then(|| (g.0, g.1.iter().cloned().collect())))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(net: &str, b: u8) -> PeerId {
        PeerId {
            network: net.into(),
            key: PeerKey([b; 32]),
        }
    }

    #[tokio::test]
    async fn presence_delivery_and_newest_wins() {
        let (r, mut inbox) = MemoryRegistry::new("n1".into());
        let a = pid("x", 1);
        let b = pid("x", 2);
        r.register(&a, 10).await.unwrap();
        assert_eq!(r.watch(&a, &[b.key]).await.unwrap(), vec![(b.key, false)]);
        r.register(&b, 20).await.unwrap();
        let e = inbox.recv().await.unwrap();
        assert_eq!(e.to, a);
        assert_eq!(
            e.delivery,
            Delivery::Presence {
                key: b.key,
                online: true
            }
        );
        // Newer connection for b: the old one is superseded, no presence flap.
        r.register(&b, 21).await.unwrap();
        let e = inbox.recv().await.unwrap();
        assert_eq!(e.delivery, Delivery::Superseded { conn: 20 });
        // The stale connection's unregister does nothing.
        r.unregister(&b, 20).await.unwrap();
        assert!(r.is_online(&b).await.unwrap());
        r.unregister(&b, 21).await.unwrap();
        let e = inbox.recv().await.unwrap();
        assert_eq!(
            e.delivery,
            Delivery::Presence {
                key: b.key,
                online: false
            }
        );
        // Other networks are invisible.
        assert_eq!(
            r.deliver(&pid("y", 1), Delivery::Superseded { conn: 1 })
                .await,
            Err(RegistryError::NotFound)
        );
    }
}
