//! ontop's tooling, built apart from the daemon so that `ontop serve`
//! links none of it:
//! - [`client`]: containerd's Snapshots API, one method per RPC, direct to
//!   a proxy snapshotter or through containerd's own service;
//! - [`mounter`]: performs mount specs the way containerd does;
//! - [`mod@bench`]: `ontop-bench` (also run as `ontop bench`), which compares
//!   snapshotters side by side through the Snapshots API;
//! - [`powercut`]: the workload of the power-cut test, which records every
//!   answer on the disk it runs on.
//!
//! ontop's integration tests use the client and the mounter too.

pub mod bench;
pub mod client;
pub mod mounter;
pub mod powercut;
