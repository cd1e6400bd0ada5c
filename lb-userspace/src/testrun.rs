//! BPF_PROG_TEST_RUN: runs a loaded XDP program over a packet in the kernel.
