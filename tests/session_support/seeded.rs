//! Seeded randomness for the reliability loops: a replayable seed from the environment
//! and a small xorshift generator.

/// An integer from the environment variable `name` (e.g. a seed or a round count).
pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The next xorshift64 value of `seed` (never 0 for a non-zero seed).
pub fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}
