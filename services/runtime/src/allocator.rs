//! Every process that links this crate allocates with mimalloc, not glibc's malloc.
//!
//! Why: a burst leaves glibc's heap in pieces, and it stays so. On fresh `scripts/bench
//! --stack`s (2026-12-03, two of each, 15 s each at 2,029, 1,739 and 1,884 jobs/s between steps
//! at 942/s): with glibc the results service spent 7.8% of its samples in `_int_malloc` before
//! the burst and 23.3% after it (18.2% a minute later); it used 0.35-0.36 cores at 942/s before,
//! 0.48-0.49 after and 0.43-0.44 a minute later, and kept the 385-388 MiB the burst grew it to
//! (30 MiB before). With mimalloc: 0.31-0.34 cores before, after and a minute later, 53-61 MiB
//! at the end, and the worker 0.25-0.28 cores against 0.29-0.32. mimalloc keeps free lists per
//! page and gives freed memory back to the system.
//!
//! The attribute may appear once in a crate graph; binaries get it by linking this crate.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
