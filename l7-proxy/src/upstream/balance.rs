//! Load-balancing algorithms. Each picks one member index among the members the caller says
//! are eligible (available and not already tried by this request).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::Member;
use crate::config::Algorithm;

/// A group's balancer state.
pub enum Balancer {
    RoundRobin(AtomicUsize),
    /// Smooth weighted round robin: the current weight of each member.
    Weighted(Mutex<Vec<i64>>),
    LeastRequest,
    ConsistentHash(HashRing),
}

impl Balancer {
    pub fn new(algorithm: Algorithm, members: &[Arc<Member>]) -> Self {
        match algorithm {
            Algorithm::RoundRobin => Self::RoundRobin(AtomicUsize::new(0)),
            Algorithm::Weighted => Self::Weighted(Mutex::new(vec![0; members.len()])),
            Algorithm::LeastRequest => Self::LeastRequest,
            Algorithm::ConsistentHash => Self::ConsistentHash(HashRing::new(
                &members
                    .iter()
                    .map(|m| (m.addr, m.weight))
                    .collect::<Vec<_>>(),
            )),
        }
    }

    /// Picks a member; `hash` is the request's key for consistent hashing.
    pub fn pick(
        &self,
        members: &[Arc<Member>],
        eligible: impl Fn(usize) -> bool,
        hash: Option<u64>,
    ) -> Option<usize> {
        match self {
            Self::RoundRobin(next) => {
                let candidates: Vec<usize> = (0..members.len()).filter(|&i| eligible(i)).collect();
                if candidates.is_empty() {
                    return None;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                Some(candidates[n % candidates.len()])
            }
            Self::Weighted(current) => {
                let mut current = current.lock().unwrap_or_else(|e| e.into_inner());
                let mut total = 0i64;
                let mut best: Option<usize> = None;
                for (i, m) in members.iter().enumerate() {
                    if !eligible(i) {
                        continue;
                    }
                    current[i] += i64::from(m.weight);
                    total += i64::from(m.weight);
                    if best.is_none_or(|b| current[i] > current[b]) {
                        best = Some(i);
                    }
                }
                let best = best?;
                current[best] -= total;
                Some(best)
            }
            Self::LeastRequest => {
                let candidates: Vec<usize> = (0..members.len()).filter(|&i| eligible(i)).collect();
                match candidates.len() {
                    0 => None,
                    1 => Some(candidates[0]),
                    n => {
                        let a = fastrand::usize(..n);
                        let mut b = fastrand::usize(..n - 1);
                        if b >= a {
                            b += 1;
                        }
                        let (a, b) = (candidates[a], candidates[b]);
                        Some(if members[b].in_flight() < members[a].in_flight() {
                            b
                        } else {
                            a
                        })
                    }
                }
            }
            Self::ConsistentHash(ring) => ring.lookup(hash.unwrap_or(0), eligible),
        }
    }
}

/// Consistent hash ring with virtual nodes. A member's points depend only on its address, so
/// adding or removing a member moves only the keys that land on its points (about 1/N).
pub struct HashRing {
    /// (point, member index), sorted by point.
    points: Vec<(u64, usize)>,
    members: usize,
}

/// Virtual nodes per unit of weight.
const VNODES_PER_WEIGHT: u32 = 160;

impl HashRing {
    pub fn new(members: &[(SocketAddr, u32)]) -> Self {
        let mut points = Vec::new();
        for (i, (addr, weight)) in members.iter().enumerate() {
            for v in 0..weight.saturating_mul(VNODES_PER_WEIGHT) {
                points.push((hash_bytes(format!("{addr}#{v}").as_bytes()), i));
            }
        }
        points.sort_unstable();
        Self {
            points,
            members: members.len(),
        }
    }

    /// The first eligible member clockwise from `hash`.
    pub fn lookup(&self, hash: u64, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|&(p, _)| p < hash);
        let mut tried = vec![false; self.members];
        for k in 0..self.points.len() {
            let (_, member) = self.points[(start + k) % self.points.len()];
            if tried[member] {
                continue;
            }
            if eligible(member) {
                return Some(member);
            }
            tried[member] = true;
        }
        None
    }
}

/// FNV-1a followed by a SplitMix64 finaliser: stable across runs and builds.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<(SocketAddr, u32)> {
        (0..n)
            .map(|i| (SocketAddr::from(([10, 0, 0, 1], 8000 + i)), 1))
            .collect()
    }

    #[test]
    fn ring_moves_about_one_nth_when_a_member_joins() {
        let before = HashRing::new(&addrs(4));
        let after = HashRing::new(&addrs(5));
        let keys = 10_000u64;
        let mut moved = 0;
        for k in 0..keys {
            let h = hash_bytes(&k.to_le_bytes());
            let a = before.lookup(h, |_| true).unwrap();
            let b = after.lookup(h, |_| true).unwrap();
            if a != b {
                assert_eq!(b, 4, "a moved key must move to the new member");
                moved += 1;
            }
        }
        let frac = moved as f64 / keys as f64;
        assert!((0.12..0.28).contains(&frac), "moved {frac}");
    }

    #[test]
    fn ring_skips_ineligible_members() {
        let ring = HashRing::new(&addrs(3));
        for k in 0..100u64 {
            let h = hash_bytes(&k.to_le_bytes());
            let first = ring.lookup(h, |_| true).unwrap();
            let second = ring.lookup(h, |i| i != first).unwrap();
            assert_ne!(first, second);
        }
    }
}
