//! ontop: a containerd snapshotter served as a proxy plugin.
//!
//! The daemon, from the socket inwards (docs/design.md lists every module
//! in the order they stand, each using only those below it):
//! - [`server`] binds the socket (or takes systemd's), serves the gRPC
//!   services and, through `exporter`, the metrics endpoint, and shuts
//!   down gracefully;
//! - `grpc` translates containerd's Snapshots API and ontop's admin API;
//! - `snapshotter` holds the contract's rules and orders transactions
//!   against filesystem steps;
//! - its policies: [`base`] (which host bases are allowed, pinning them,
//!   the pins a crash left) and `idmap` (who maps a user namespace's ids);
//! - `store` owns the SQLite schema and every query, and the group commit;
//! - `layout` owns the directories under the root; [`pin`] binds host
//!   bases read-only; `removal` deletes trees there without crossing a
//!   mount;
//! - `mounts` (mount specs) and [`filter`] (containerd's filter language)
//!   are pure; `labels` checks and merges labels;
//! - [`usage`] counts a tree's disk usage; `watch` tells which upper dirs
//!   changed, so Usage walks only those;
//! - `caller` tells a containerd 1.x caller from the rest;
//! - `error` is the one mapping of errors to gRPC codes;
//! - `metrics` counts for Prometheus, a leaf that reads the core through
//!   its `State` trait; `systemd` speaks socket activation and sd_notify.
//!
//! Shared by the daemon and the tools: [`config`], [`backend`] (the two
//! ways mounts are made, checked at start-up), [`snapshot`] (the domain
//! model), and the compiled protos. The command line's own: [`command`] (its
//! definition), [`cli`], [`check`] (`ontop check`), [`containerd_config`] (`ontop
//! containerd-config`) and [`dial`] (a channel to a running daemon).
//!
//! The benchmark, the test client and the mounter live in the
//! `ontop-tools` crate (`tools/`), so the daemon's binary carries none of
//! them.
//!
//! Only what the binary and the tests use is public; the daemon's insides
//! are `pub(crate)`, so the compiler reports what nothing uses.

/// This build's version: the package's, unless the build set
/// `ONTOP_BUILD_VERSION` (a test's "newer build" of the same source).
pub const VERSION: &str = match option_env!("ONTOP_BUILD_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

pub(crate) mod apply;
pub mod backend;
pub mod base;
pub(crate) mod caller;
pub mod check;
pub mod cli;
pub mod command;
pub mod config;
pub mod containerd_config;
pub mod dial;
pub(crate) mod differ;
pub(crate) mod error;
pub(crate) mod exporter;
pub mod filter;
pub(crate) mod grpc;
pub(crate) mod idmap;
pub(crate) mod labels;
pub(crate) mod layout;
pub mod limit;
pub(crate) mod metrics;
pub(crate) mod mounts;
pub mod pin;
pub(crate) mod private_mount;
pub(crate) mod removal;
pub mod server;
pub mod snapshot;
pub(crate) mod snapshotter;
pub(crate) mod sockets;
pub(crate) mod store;
pub(crate) mod syncfs;
pub(crate) mod systemd;
pub mod takeover;
pub mod usage;
pub(crate) mod watch;

/// ontop's own `ontop.v1` admin API.
pub mod admin {
    pub mod v1 {
        tonic::include_proto!("ontop.v1");
    }
}

/// containerd's Snapshots API, compiled from the protos of Debian's
/// containerd API package (2.1.9) in `proto/containerd/`, with the one
/// field containerd 2.2 added (see proto/README.md).
pub mod containerd_api {
    /// The modules nest as the proto packages do, because prost refers
    /// from one package to another by relative path.
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod diff {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.diff.v1");
                }
            }
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
    pub use containerd::services::diff;
    pub use containerd::services::snapshots;
    pub use containerd::types;
}
