//! The one small PRNG of the state machines: xorshift64* (Vigna), seeded by the driver.
//!
//! Used where values need to be distinct and spread, not secret — STUN/TURN transaction ids,
//! probe transaction ids, random ports to spray. Nothing security-relevant depends on it:
//! probes are authenticated, and whoever could forge an answer could as well drop it.

/// Advances `state` (never 0: seed with `seed | 1`) and returns the next value.
pub(crate) fn xorshift64star(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}
