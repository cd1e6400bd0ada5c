//! Shared helpers for the integration tests: the packet-fixture harness (BPF_PROG_TEST_RUN
//! over the real XDP object) and packet builders.

pub mod fixture;
pub mod packets;
