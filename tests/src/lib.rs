//! Shared helpers for the integration tests: the packet-fixture harness (BPF_PROG_TEST_RUN
//! over the real XDP object) and packet builders ([`fixture`], [`packets`]); and for the
//! end-to-end tests, network namespaces ([`netns`]), the test network ([`topology`]), backend
//! servers and clients ([`servers`]) and an in-process agent ([`agent`]).

pub mod agent;
pub mod fixture;
pub mod netns;
pub mod packets;
pub mod servers;
pub mod topology;
