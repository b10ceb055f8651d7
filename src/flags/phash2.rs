//! A pure-Rust `erlang:phash2/2`, bit-identical to the BEAM for binaries,
//! atoms, integers and the salted pair `{Salt, Term}`.
//!
//! Rollout cohorts are computed on both sides of the NIF boundary: Erlang
//! code calls `erlang:phash2({Salt, Id}, 100)` directly, Rust code calls
//! [`phash2_salted`]. Both must put every id in the same bucket, so this module
//! reimplements `make_hash2` from OTP's `erts/emulator/beam/utils.c` (moved to
//! `erl_term_hashing.c` in OTP 26, unchanged) and is checked against a real
//! `erl` in `tests/phash2_erl.rs`.
//!
//! # Why not `enif_hash`
//!
//! A NIF could ask the VM with `enif_hash(ERL_NIF_PHASH2, Term, 0)`, but that
//! returns `erlang:phash2/1`, which keeps only the low **27 bits** of the hash.
//! `erlang:phash2(T, 100)` is `make_hash2(T) rem 100` of the full 32 bits, and
//! `(h & (2^27 - 1)) rem 100` is a different number for most `h`. It would
//! also tie flag evaluation to a running VM, which Rust services and the CLI
//! do not have.
//!
//! # The algorithm
//!
//! `make_hash2` walks the term with a running 32-bit `hash`, starting at `0`,
//! and mixes values in with Bob Jenkins' 96-bit `MIX` (lookup2):
//!
//! - `UINT32_HASH_2(x, y, K)`: `a = K + x; b = K + y; MIX(a, b, hash)`, and
//!   `UINT32_HASH(x, K)` is `UINT32_HASH_2(x, 0, K)`. The constants `K` are
//!   `HCONST_n = n * 0x9e3779b9 mod 2^32`.
//! - **Binary**: `hash = block_hash(bytes, HCONST_13 + hash)`, Jenkins'
//!   lookup2 over 12-byte blocks with `a = b = 0x9e3779b9`, `c = initval`; the
//!   byte length is added to `c` before the last (partial, possibly empty)
//!   block is mixed. The empty binary is not block-hashed at all: it yields the
//!   initval, so `<<>>` at top level is `HCONST_13 = 0x08d12e65`.
//!   (For binaries of 4 GiB and more only the first `len mod 2^32` bytes are
//!   used, as in the VM.)
//! - **Atom**: the atom table's hash of the name: `hashpjw` over the stored
//!   UTF-8 text, except that a two-byte sequence `C2/C3 xx` (a code point in
//!   `0x80..=0xFF`) is folded back to its single latin-1 byte first, so the
//!   value matches the latin-1 atom tables of OTP R16 and earlier. Characters
//!   above 255 are hashed byte by byte of their UTF-8 encoding. When `hash` is
//!   still `0` (a top-level atom) the value is used as is; otherwise it is
//!   mixed with `UINT32_HASH(h, HCONST_3)`.
//! - **Integer** `-2^27 <= x < 2^27`: `SINT32_HASH`: `UINT32_HASH(x as u32,
//!   HCONST)`, preceded by `UINT32_HASH(-x, HCONST)` when `x` is negative
//!   ("negative numbers are unnecessarily mixed twice").
//! - **Any other integer**, small or bignum alike: for each 64-bit limb of
//!   `|x|`, least significant first, `UINT32_HASH_2(lo32, hi32, K)` with
//!   `K = HCONST_10` for negative and `HCONST_11` for positive numbers. A
//!   small integer above 2^27 hashes exactly like the one-limb bignum, so
//!   the small/bignum boundary (`2^59 - 1` on 64-bit) does not show.
//! - **Tuple** `{E1, .., En}`: `UINT32_HASH(n, HCONST_9)`, then the elements
//!   in order `E1 .. En`, each mixed into the running hash as above.
//!
//! `erlang:phash2(T, Range)` is `make_hash2(T) rem Range` (the whole 32-bit
//! hash when `Range = 2^32`); `erlang:phash2(T)` is `make_hash2(T)` masked to
//! 27 bits.
//!
//! Nothing here allocates or can panic; the cost is one `MIX` per 12 bytes
//! of a binary or per 64-bit limb of an integer.

use super::value::Value;

/// The golden ratio, Jenkins' arbitrary constant.
const HCONST: u32 = 0x9e37_79b9;
/// `HCONST * 3`: mixing an atom into a non-zero hash.
const HCONST_3: u32 = 0xdaa6_6d2b;
/// `HCONST * 9`: tuple arity.
const HCONST_9: u32 = 0x8ff3_4781;
/// `HCONST * 10`: negative integers outside the 28-bit range.
const HCONST_10: u32 = 0x2e2a_c13a;
/// `HCONST * 11`: positive integers outside the 28-bit range.
const HCONST_11: u32 = 0xcc62_3af3;
/// `HCONST * 13`: binaries.
const HCONST_13: u32 = 0x08d1_2e65;

/// `2^27`: integers in `-2^27..2^27` take the `SINT32_HASH` path.
const SSMALL28_LIMIT: u64 = 1 << 27;

/// `make_hash2(Term)`: the full 32-bit hash, `erlang:phash2(Term, 4294967296)`.
///
/// An [`Value::Int`] and a [`Value::BigInt`] of the same value hash the same,
/// whatever leading zero bytes the magnitude has, and `-0` is `0`.
#[must_use]
#[inline(always)]
pub fn hash(term: &Value<'_>) -> u32 {
    mix_term(0, term, None)
}

/// A foreign value's hash, as its holder answers it (`0` while unknown: the
/// context is then incomplete and the evaluation a placeholder). Out of line:
/// the common terms' path stays as it was.
#[cold]
#[inline(never)]
fn foreign_hash(f: &dyn super::ForeignTerm, salt: Option<&[u8]>) -> u32 {
    f.hash(salt).unwrap_or(0)
}

/// `make_hash2({Salt, Term})` with `Salt` a binary: the full 32-bit hash,
/// `erlang:phash2({Salt, Term}, 4294967296)`.
#[must_use]
#[inline]
pub fn hash_salted(salt: &[u8], term: &Value<'_>) -> u32 {
    let h = uint32_hash_2(0, 2, 0, HCONST_9);
    let h = mix_binary(h, salt);
    mix_term(h, term, Some(salt))
}

/// `erlang:phash2(Term, Range)`: the hash of `term` modulo `range`, in
/// `0..range`. A `range` of `0` is treated as `1` (the result is then `0`).
///
/// # Examples
/// ```
/// use erlmcp_rollout::flags::{phash2::phash2, Value};
/// assert_eq!(phash2(&Value::Binary(b"session-123"), 100), 98);
/// assert_eq!(phash2(&Value::Int(42), 1 << 27), 30328728);
/// ```
#[must_use]
#[inline(always)]
pub fn phash2(term: &Value<'_>, range: u32) -> u32 {
    hash(term) % range.max(1)
}

/// `erlang:phash2({Salt, Term}, Range)` with `Salt` a binary: the salted hash
/// modulo `range`, in `0..range`. A `range` of `0` is treated as `1`.
#[must_use]
#[inline]
pub fn phash2_salted(salt: &[u8], term: &Value<'_>, range: u32) -> u32 {
    hash_salted(salt, term) % range.max(1)
}

/// The atom table's hash of an atom name (`atom_hash` in `atom.c`):
/// `hashpjw` over the UTF-8 text with `C2/C3 xx` pairs folded to latin-1.
///
/// This is also `erlang:phash2(Atom, 4294967296)`.
#[must_use]
pub fn atom_hash(name: &str) -> u32 {
    let mut h: u32 = 0;
    let mut bytes = name.as_bytes().iter();
    while let Some(&first) = bytes.next() {
        let mut v = first;
        // "latin1 clutch for r16": U+0080..=U+00FF count as one byte.
        if first & 0xFE == 0xC2 {
            if let Some(&next) = bytes.as_slice().first() {
                if next & 0xC0 == 0x80 {
                    // `byte v = (v << 6) | (next & 0x3F)` truncates to 8 bits.
                    v = (first << 6) | (next & 0x3F);
                    bytes.next();
                }
            }
        }
        // hashpjw. `HashValue` is wider than 32 bits on 64-bit systems, but
        // carries out of bit 31 never flow back, so wrapping is equivalent.
        h = (h << 4).wrapping_add(u32::from(v));
        let g = h & 0xf000_0000;
        if g != 0 {
            h ^= g >> 24;
            h ^= g;
        }
    }
    h
}

/// Mix one term into the running hash `h` (one step of `make_hash2`'s loop).
/// Must stay inlined into the caller that built the `Value`, so the value and
/// its tag stay in registers (BENCHMARKS.md, issue 3).
#[inline(always)]
/// `salt` only serves a foreign value, whose whole hash (of `T` or of
/// `{Salt, T}`) its holder answers: `h` is then not used.
fn mix_term(h: u32, term: &Value<'_>, salt: Option<&[u8]>) -> u32 {
    match *term {
        Value::Binary(bytes) => mix_binary(h, bytes),
        Value::Atom(name) => {
            let a = atom_hash(name);
            if h == 0 {
                a
            } else {
                uint32_hash_2(h, a, 0, HCONST_3)
            }
        }
        Value::Int(i) => mix_integer(h, i < 0, i.unsigned_abs()),
        Value::BigInt { negative, magnitude } => mix_bigint(h, negative, magnitude),
        Value::Foreign(f) => foreign_hash(f, salt),
    }
}

/// Mix an integer `±magnitude` that fits in 64 bits.
#[inline]
fn mix_integer(h: u32, negative: bool, magnitude: u64) -> u32 {
    if magnitude < SSMALL28_LIMIT || (negative && magnitude == SSMALL28_LIMIT) {
        // SINT32_HASH: |x| <= 2^27, so the i32 negation cannot overflow and
        // `magnitude as u32` is exact.
        let m = magnitude as u32;
        if negative && m != 0 {
            let h = uint32_hash_2(h, m, 0, HCONST);
            uint32_hash_2(h, m.wrapping_neg(), 0, HCONST)
        } else {
            uint32_hash_2(h, m, 0, HCONST)
        }
    } else {
        uint32_hash_2(
            h,
            magnitude as u32,
            (magnitude >> 32) as u32,
            if negative { HCONST_10 } else { HCONST_11 },
        )
    }
}

/// Mix an integer given as sign and little-endian magnitude bytes.
fn mix_bigint(h: u32, negative: bool, magnitude: &[u8]) -> u32 {
    // Drop most significant zero bytes: the VM's bignums are normalized.
    let len = magnitude.iter().rposition(|&b| b != 0).map_or(0, |last| last + 1);
    let digits = magnitude.get(..len).unwrap_or_default();
    if digits.len() <= 8 {
        return mix_integer(h, negative, limb(digits));
    }
    let con = if negative { HCONST_10 } else { HCONST_11 };
    digits.chunks(8).fold(h, |h, chunk| {
        let t = limb(chunk);
        uint32_hash_2(h, t as u32, (t >> 32) as u32, con)
    })
}

/// Up to 8 little-endian bytes as a `u64`.
#[inline]
fn limb(bytes: &[u8]) -> u64 {
    bytes.iter().rev().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

/// Mix a binary: `block_hash(bytes, HCONST_13 + h)`.
#[inline]
fn mix_binary(h: u32, bytes: &[u8]) -> u32 {
    // The VM truncates the byte size to 32 bits (a no-op below 4 GiB).
    let size = bytes.len() as u32;
    let con = HCONST_13.wrapping_add(h);
    if size == 0 {
        // The empty binary is not run through `block_hash` at all.
        return con;
    }
    let bytes = bytes.get(..size as usize).unwrap_or(bytes);
    block_hash(bytes, size, con)
}

/// Bob Jenkins' lookup2 hash as `block_hash` in `utils.c`; `length` is the
/// byte length truncated to 32 bits.
#[inline]
fn block_hash(bytes: &[u8], length: u32, initval: u32) -> u32 {
    let mut a = HCONST;
    let mut b = HCONST;
    let mut c = initval;
    let blocks = bytes.chunks_exact(12);
    let tail = blocks.remainder();
    for block in blocks {
        if let [a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3] = *block {
            a = a.wrapping_add(u32::from_le_bytes([a0, a1, a2, a3]));
            b = b.wrapping_add(u32::from_le_bytes([b0, b1, b2, b3]));
            c = c.wrapping_add(u32::from_le_bytes([c0, c1, c2, c3]));
            mix(&mut a, &mut b, &mut c);
        }
    }
    // The last 0..=11 bytes, zero-padded; the low byte of `c` is reserved
    // for the length. The words are assembled in registers from the bytes,
    // never copied into a buffer and read back (BENCHMARKS.md, issue 3).
    let byte = |i: usize, shift: u32| tail.get(i).map_or(0, |&b| u32::from(b) << shift);
    let word = |at: usize| byte(at, 0) | byte(at + 1, 8) | byte(at + 2, 16) | byte(at + 3, 24);
    c = c.wrapping_add(length);
    a = a.wrapping_add(word(0));
    b = b.wrapping_add(word(4));
    c = c.wrapping_add(byte(8, 8) | byte(9, 16) | byte(10, 24));
    mix(&mut a, &mut b, &mut c);
    c
}

/// `UINT32_HASH_2(x, y, k)` on the running hash `h`: returns the new hash.
#[inline]
fn uint32_hash_2(h: u32, x: u32, y: u32, k: u32) -> u32 {
    let mut a = k.wrapping_add(x);
    let mut b = k.wrapping_add(y);
    let mut c = h;
    mix(&mut a, &mut b, &mut c);
    c
}

/// Bob Jenkins' lookup2 `MIX(a, b, c)`.
#[inline(always)]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*b).wrapping_sub(*c) ^ (*c >> 13);
    *b = b.wrapping_sub(*c).wrapping_sub(*a) ^ (*a << 8);
    *c = c.wrapping_sub(*a).wrapping_sub(*b) ^ (*b >> 13);
    *a = a.wrapping_sub(*b).wrapping_sub(*c) ^ (*c >> 12);
    *b = b.wrapping_sub(*c).wrapping_sub(*a) ^ (*a << 16);
    *c = c.wrapping_sub(*a).wrapping_sub(*b) ^ (*b >> 5);
    *a = a.wrapping_sub(*b).wrapping_sub(*c) ^ (*c >> 3);
    *b = b.wrapping_sub(*c).wrapping_sub(*a) ^ (*a << 10);
    *c = c.wrapping_sub(*a).wrapping_sub(*b) ^ (*b >> 15);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hconst_multiples() {
        for (n, k) in [
            (3, HCONST_3),
            (9, HCONST_9),
            (10, HCONST_10),
            (11, HCONST_11),
            (13, HCONST_13),
        ] {
            assert_eq!(HCONST.wrapping_mul(n), k, "HCONST_{n}");
        }
    }

    #[test]
    fn binaries_match_erl() {
        assert_eq!(hash(&Value::Binary(b"session-123")), 2_636_965_098);
        assert_eq!(phash2(&Value::Binary(b"session-123"), 100), 98);
        assert_eq!(hash(&Value::Binary(b"")), HCONST_13);
        assert_eq!(hash(&Value::Binary(b"")), 147_926_629);
    }

    #[test]
    fn atoms_match_erl() {
        // phash2(ok) = 1883 (27 bits); the atom hash is below 2^28 anyway.
        assert_eq!(hash(&Value::Atom("ok")) & ((1 << 27) - 1), 1883);
        assert_eq!(hash(&Value::Atom("ok")), 1883);
        assert_eq!(hash(&Value::Atom("abc")), 26_499);
        // 'é' is stored as C3 A9 but hashed as the latin-1 byte E9.
        assert_eq!(hash(&Value::Atom("é")), 233);
    }

    #[test]
    fn integers_match_erl() {
        assert_eq!(hash(&Value::Int(42)) & ((1 << 27) - 1), 30_328_728);
        let cases: [(i64, u32); 9] = [
            (0, 3_175_731_469),
            (1, 539_485_162),
            (-1, 1_117_813_597),
            ((1 << 27) - 1, 4_273_352_567),
            (1 << 27, 2_562_491_755),
            (-(1 << 27), 874_979_335),
            (-(1 << 27) - 1, 1_418_916_782),
            ((1 << 59) - 1, 1_638_133_000),
            (1 << 59, 2_442_888_721),
        ];
        for (x, expected) in cases {
            assert_eq!(hash(&Value::Int(x)), expected, "{x}");
        }
        let two_64 = [0, 0, 0, 0, 0, 0, 0, 0, 1];
        let big = |magnitude| Value::BigInt {
            negative: false,
            magnitude,
        };
        assert_eq!(hash(&big(&two_64)), 2_519_041_713);
        let mut two_100 = [0u8; 13];
        two_100[12] = 0x10;
        let neg = Value::BigInt {
            negative: true,
            magnitude: &two_100,
        };
        assert_eq!(hash(&neg), 3_614_518_472);
    }

    #[test]
    fn bigint_normalization() {
        let v = Value::BigInt {
            negative: false,
            magnitude: &[42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        assert_eq!(hash(&v), hash(&Value::Int(42)));
        let zero = Value::BigInt {
            negative: true,
            magnitude: &[0, 0],
        };
        assert_eq!(hash(&zero), hash(&Value::Int(0)));
        let empty = Value::BigInt {
            negative: true,
            magnitude: &[],
        };
        assert_eq!(hash(&empty), hash(&Value::Int(0)));
        let min = Value::BigInt {
            negative: true,
            magnitude: &[0, 0, 0, 0, 0, 0, 0, 0x80, 0],
        };
        assert_eq!(hash(&min), hash(&Value::Int(i64::MIN)));
    }

    #[test]
    fn salted_matches_erl() {
        assert_eq!(hash_salted(b"salt", &Value::Binary(b"v")), 380_589_835);
    }

    #[test]
    fn zero_range_does_not_panic() {
        assert_eq!(phash2(&Value::Binary(b"x"), 0), 0);
        assert_eq!(phash2_salted(b"s", &Value::Int(1), 0), 0);
        assert_eq!(
            phash2(&Value::Binary(b"x"), u32::MAX),
            hash(&Value::Binary(b"x")) % u32::MAX
        );
    }
}
