//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4).
//!
//! The datapath hashes each flow's 5-tuple with [`flow_hash`] and reads the backend at
//! `hash % M` of the VIP's lookup table. The agent builds that table with [`build_table`]:
//! each backend gets a permutation of the table's positions from two hashes of its identity
//! (`offset = h1 % M`, `skip = h2 % (M - 1) + 1`), and backends take turns claiming their next
//! preferred free position until the table is full. Weights give a backend proportionally
//! more turns. The result depends only on the set of (identity, weight) pairs and M, never on
//! insertion order, so two agents with the same configuration build identical tables.

/// 32-bit finaliser of MurmurHash3: a cheap, well-mixing step the verifier accepts.
#[inline(always)]
pub const fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
const fn absorb(h: u32, word: u32) -> u32 {
    let k = word
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Hash of a flow, as computed by the datapath. Ports are in network byte order, as on the
/// wire; pass 0 for both to hash addresses only.
#[inline(always)]
pub fn flow_hash(src: &[u8; 16], dst: &[u8; 16], sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = 0x9747_b28c_u32;
    h = absorb(h, word(src, 0));
    h = absorb(h, word(src, 4));
    h = absorb(h, word(src, 8));
    h = absorb(h, word(src, 12));
    h = absorb(h, word(dst, 0));
    h = absorb(h, word(dst, 4));
    h = absorb(h, word(dst, 8));
    h = absorb(h, word(dst, 12));
    h = absorb(h, ((sport as u32) << 16) | dport as u32);
    h = absorb(h, proto as u32);
    mix32(h ^ 37)
}

#[cfg(feature = "user")]
pub use table::*;

#[cfg(feature = "user")]
mod table {
    extern crate alloc;
    use alloc::vec;
    use alloc::vec::Vec;

    /// A backend as Maglev sees it: a stable identity (its address), a weight, and the id the
    /// datapath uses for it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct MaglevBackend {
        /// Stable identity: the backend's 16-byte address. Hashing the identity (not the id)
        /// is what makes tables identical across agents.
        pub identity: [u8; 16],
        pub weight: u32,
        /// The value written into the table for this backend.
        pub id: u32,
    }

    /// Why a table could not be built.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum MaglevError {
        /// M must be a prime (the permutation needs `skip` coprime with M).
        SizeNotPrime(u32),
        /// More backends with weight than positions in the table.
        TooManyBackends { backends: usize, size: u32 },
        /// Two backends with the same identity.
        DuplicateIdentity([u8; 16]),
    }

    impl core::fmt::Display for MaglevError {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self {
                Self::SizeNotPrime(m) => write!(f, "Maglev table size {m} is not a prime"),
                Self::TooManyBackends { backends, size } => write!(
                    f,
                    "{backends} backends do not fit a Maglev table of size {size}"
                ),
                Self::DuplicateIdentity(id) => write!(f, "backend identity {id:?} appears twice"),
            }
        }
    }

    /// True for primes; trial division is fast enough for table sizes (at most 65537).
    pub fn is_prime(n: u32) -> bool {
        if n < 2 {
            return false;
        }
        let mut d = 2u32;
        while d.saturating_mul(d) <= n {
            if n.is_multiple_of(d) {
                return false;
            }
            d += 1;
        }
        true
    }

    fn identity_hash(identity: &[u8; 16], seed: u32) -> u32 {
        super::flow_hash(identity, &[0; 16], (seed >> 16) as u16, seed as u16, 0xab)
    }

    /// Builds the lookup table of size `m`. Backends with weight 0 get no entries (drain).
    /// With no weighted backend every entry is [`crate::NO_BACKEND`].
    pub fn build_table(backends: &[MaglevBackend], m: u32) -> Result<Vec<u32>, MaglevError> {
        if !is_prime(m) {
            return Err(MaglevError::SizeNotPrime(m));
        }
        let mut live: Vec<MaglevBackend> =
            backends.iter().copied().filter(|b| b.weight > 0).collect();
        // Insertion order must not matter: sort by identity.
        live.sort_by_key(|b| b.identity);
        for pair in live.windows(2) {
            if pair[0].identity == pair[1].identity {
                return Err(MaglevError::DuplicateIdentity(pair[0].identity));
            }
        }
        if live.len() > m as usize {
            return Err(MaglevError::TooManyBackends {
                backends: live.len(),
                size: m,
            });
        }
        let mut table = vec![crate::NO_BACKEND; m as usize];
        if live.is_empty() {
            return Ok(table);
        }
        let m64 = m as u64;
        let perms: Vec<(u64, u64)> = live
            .iter()
            .map(|b| {
                let offset = identity_hash(&b.identity, 0x5eed_0001) as u64 % m64;
                let skip = identity_hash(&b.identity, 0x5eed_0002) as u64 % (m64 - 1) + 1;
                (offset, skip)
            })
            .collect();
        let max_weight = live.iter().map(|b| b.weight as u64).max().unwrap_or(1);
        // next[i]: how far backend i has walked its permutation.
        let mut next = vec![0u64; live.len()];
        // credit[i]: weighted turns owed to backend i, in units of 1/max_weight.
        let mut credit = vec![0u64; live.len()];
        let mut filled = 0u32;
        'fill: loop {
            for (i, b) in live.iter().enumerate() {
                credit[i] += b.weight as u64;
                while credit[i] >= max_weight {
                    credit[i] -= max_weight;
                    let (offset, skip) = perms[i];
                    let mut pos = ((offset + next[i] * skip) % m64) as usize;
                    while table[pos] != crate::NO_BACKEND {
                        next[i] += 1;
                        pos = ((offset + next[i] * skip) % m64) as usize;
                    }
                    table[pos] = b.id;
                    next[i] += 1;
                    filled += 1;
                    if filled == m {
                        break 'fill;
                    }
                }
            }
        }
        Ok(table)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn backends(n: u32) -> Vec<MaglevBackend> {
            (0..n)
                .map(|i| {
                    let mut identity = [0u8; 16];
                    identity[..4].copy_from_slice(&[10, 1, (i >> 8) as u8, i as u8]);
                    MaglevBackend {
                        identity,
                        weight: 1,
                        id: i,
                    }
                })
                .collect()
        }

        fn counts(table: &[u32], n: usize) -> Vec<usize> {
            let mut c = vec![0usize; n];
            for &id in table {
                c[id as usize] += 1;
            }
            c
        }

        #[test]
        fn balance_100_backends_within_one_percent() {
            let t = build_table(&backends(100), 65537).unwrap();
            assert!(t.iter().all(|&id| id < 100));
            let c = counts(&t, 100);
            let max = *c.iter().max().unwrap() as f64;
            let mean = 65537.0 / 100.0;
            assert!(max / mean <= 1.01, "max/mean = {}", max / mean);
        }

        #[test]
        fn removing_one_backend_moves_little() {
            for n in [10u32, 100] {
                let all = backends(n);
                let before = build_table(&all, 65537).unwrap();
                let removed = n / 2;
                let rest: Vec<_> = all.iter().copied().filter(|b| b.id != removed).collect();
                let after = build_table(&rest, 65537).unwrap();
                assert!(after.iter().all(|&id| id != removed));
                // Entries that belonged to the removed backend must move; count the others.
                let changed =
                    before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64 / 65537.0;
                let bound = 1.0 / n as f64 + 0.01;
                assert!(changed <= bound, "n={n}: {changed} > {bound}");
            }
        }

        #[test]
        fn weights_are_honoured_within_one_percent() {
            let mut b = backends(4);
            b[0].weight = 1;
            b[1].weight = 2;
            b[2].weight = 3;
            b[3].weight = 4;
            let t = build_table(&b, 65537).unwrap();
            let c = counts(&t, 4);
            for (i, w) in [1.0, 2.0, 3.0, 4.0].iter().enumerate() {
                let want = 65537.0 * w / 10.0;
                let ratio = c[i] as f64 / want;
                assert!(
                    (ratio - 1.0).abs() <= 0.01,
                    "backend {i}: {} vs {want}",
                    c[i]
                );
            }
        }

        #[test]
        fn weight_zero_gets_no_entries_and_others_keep_theirs() {
            let mut b = backends(5);
            let before = build_table(&b, 65537).unwrap();
            b[2].weight = 0;
            let after = build_table(&b, 65537).unwrap();
            assert!(after.iter().all(|&id| id != 2));
            let moved_from_others = before
                .iter()
                .zip(&after)
                .filter(|(a, b)| **a != 2 && a != b)
                .count();
            assert!(moved_from_others < 65537 / 100, "{moved_from_others}");
        }

        #[test]
        fn deterministic_regardless_of_order() {
            let b = backends(37);
            let mut r = b.clone();
            r.reverse();
            assert_eq!(
                build_table(&b, 65537).unwrap(),
                build_table(&r, 65537).unwrap()
            );
        }

        #[test]
        fn empty_and_errors() {
            assert!(build_table(&[], 251)
                .unwrap()
                .iter()
                .all(|&x| x == crate::NO_BACKEND));
            assert_eq!(
                build_table(&backends(3), 1000),
                Err(MaglevError::SizeNotPrime(1000))
            );
            let mut dup = backends(2);
            dup[1].identity = dup[0].identity;
            assert!(matches!(
                build_table(&dup, 251),
                Err(MaglevError::DuplicateIdentity(_))
            ));
            assert!(matches!(
                build_table(&backends(300), 251),
                Err(MaglevError::TooManyBackends { .. })
            ));
        }

        #[test]
        fn small_table_is_full() {
            let t = build_table(&backends(3), 7).unwrap();
            assert!(t.iter().all(|&id| id < 3));
        }
    }
}
