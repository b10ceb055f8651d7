//! Flag name -> compiled flag, for the evaluation hot path.
//!
//! A `HashMap<Box<[u8]>, _>` lookup compares the found key with `memcmp`
//! through the PLT and probes 112-byte buckets; this table probes 16-byte
//! slots holding a name's full hash and compares short names inline. Built
//! once per snapshot, never changed.

use std::hash::Hasher;

use rustc_hash::FxHasher;

/// Position of a flag in its snapshot's table; valid for that snapshot only
/// (a lookup with an index from another snapshot finds nothing or another
/// flag, never out of bounds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlagId(u32);

impl FlagId {
    /// The id of the `i`-th entry given to [`FlagTable::new`].
    pub(crate) fn from_index(i: usize) -> Option<FlagId> {
        u32::try_from(i).ok().filter(|i| *i != EMPTY).map(FlagId)
    }
}

#[derive(Clone, Copy)]
struct Slot {
    hash: u64,
    /// Index into `entries`; `EMPTY` for a free slot.
    index: u32,
}

const EMPTY: u32 = u32::MAX;

/// Open addressing with linear probing, at most half full.
pub(crate) struct FlagTable<V> {
    slots: Box<[Slot]>,
    mask: usize,
    entries: Vec<(Box<[u8]>, V)>,
}

#[inline(always)]
fn hash(name: &[u8]) -> u64 {
    let mut h = FxHasher::default();
    h.write(name);
    h.finish()
}

/// Byte equality without a `memcmp` call for up to 16 bytes (two
/// overlapping word compares); flag names and condition values.
#[inline(always)]
pub(crate) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let n = a.len();
    let word = |s: &[u8], at: usize| -> u64 {
        let mut w = [0u8; 8];
        if let Some(src) = s.get(at..at + 8) {
            w.copy_from_slice(src);
        }
        u64::from_le_bytes(w)
    };
    let half = |s: &[u8], at: usize| -> u32 {
        let mut w = [0u8; 4];
        if let Some(src) = s.get(at..at + 4) {
            w.copy_from_slice(src);
        }
        u32::from_le_bytes(w)
    };
    match n {
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        // Bytes 0, n/2 and n-1 cover every byte of 1..=3.
        1..=3 => a.first() == b.first() && a.get(n / 2) == b.get(n / 2) && a.last() == b.last(),
        _ => a == b,
    }
}

impl<V> FlagTable<V> {
    /// A table of `entries` (names must be distinct; a later duplicate is
    /// unreachable by name).
    pub(crate) fn new(entries: Vec<(Box<[u8]>, V)>) -> Self {
        let size = (entries.len() * 2).next_power_of_two().max(8);
        let mut slots = vec![Slot { hash: 0, index: EMPTY }; size].into_boxed_slice();
        let mask = size - 1;
        for (i, (name, _)) in entries.iter().enumerate() {
            let h = hash(name);
            let mut at = h as usize & mask;
            while let Some(slot) = slots.get_mut(at) {
                if slot.index == EMPTY {
                    *slot = Slot {
                        hash: h,
                        index: u32::try_from(i).unwrap_or(EMPTY),
                    };
                    break;
                }
                at = (at + 1) & mask;
            }
        }
        FlagTable { slots, mask, entries }
    }

    /// The id of `name`, if the table has it.
    #[inline(always)]
    pub(crate) fn find(&self, name: &[u8]) -> Option<FlagId> {
        let h = hash(name);
        let mut at = h as usize & self.mask;
        // At most half full: a free slot ends every probe.
        loop {
            let slot = self.slots.get(at)?;
            if slot.index == EMPTY {
                return None;
            }
            if slot.hash == h {
                let (n, _) = self.entries.get(slot.index as usize)?;
                if same_bytes(n, name) {
                    return Some(FlagId(slot.index));
                }
            }
            at = (at + 1) & self.mask;
        }
    }

    #[inline(always)]
    pub(crate) fn at(&self, id: FlagId) -> Option<&V> {
        self.entries.get(id.0 as usize).map(|(_, v)| v)
    }

    #[inline]
    pub(crate) fn get(&self, name: &[u8]) -> Option<&V> {
        self.find(name).and_then(|id| self.at(id))
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn finds_every_name_and_nothing_else() {
        let names: Vec<String> = (0..300).map(|i| format!("flag_{i}")).collect();
        let t = FlagTable::new(names.iter().map(|n| (n.as_bytes().into(), n.clone())).collect());
        assert_eq!(t.len(), 300);
        for n in &names {
            assert_eq!(t.get(n.as_bytes()), Some(n));
        }
        for miss in ["", "flag_", "flag_300", "flag_1 ", "Flag_1", "flag_10x"] {
            assert_eq!(t.get(miss.as_bytes()), None, "{miss}");
        }
        let empty: FlagTable<()> = FlagTable::new(Vec::new());
        assert!(empty.find(b"x").is_none());
    }

    proptest! {
        /// Same answers as a HashMap for any names and queries (short and
        /// long, including lengths 0..=17 around the inline compare's cases).
        #[test]
        fn agrees_with_a_hashmap(
            names in proptest::collection::hash_set(proptest::collection::vec(any::<u8>(), 0..20), 0..40),
            queries in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 0..40),
        ) {
            let names: Vec<Vec<u8>> = names.into_iter().collect();
            let map: std::collections::HashMap<&[u8], usize> =
                names.iter().enumerate().map(|(i, n)| (&n[..], i)).collect();
            let t = FlagTable::new(names.iter().enumerate().map(|(i, n)| (n.clone().into_boxed_slice(), i)).collect());
            for q in names.iter().chain(&queries) {
                prop_assert_eq!(t.get(q), map.get(&q[..]));
            }
            // Near misses: each name with its last byte changed.
            for n in &names {
                let mut m = n.clone();
                if let Some(b) = m.last_mut() {
                    *b ^= 1;
                    prop_assert_eq!(t.get(&m), map.get(&m[..]));
                }
            }
        }
    }
}
