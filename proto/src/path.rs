//! Path selection state machine: per peer, which candidate pair carries traffic, with failover to the relay and upgrade back to direct.
