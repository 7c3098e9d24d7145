//! Async client of the rendezvous service (QUIC): register, watch peers, exchange offers.
