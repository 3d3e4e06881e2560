//! ontop: a containerd snapshotter served as a proxy plugin.
//!
//! - [`grpc`] translates containerd's Snapshots API and ontop's admin API;
//! - [`snapshotter`] holds the contract's rules and orders transactions
//!   against filesystem steps;
//! - [`store`] owns the SQLite schema and every query;
//! - [`layout`] owns the directories under the root;
//! - [`backend`] checks that kernel overlayfs or fuse-overlayfs works here;
//! - [`mounts`] and [`filter`] are pure: mount specs, and containerd's
//!   filter language;
//! - [`watch`] tells which upper dirs changed, so Usage walks only those;
//! - [`caller`] tells a containerd 1.x caller from the rest;
//! - [`containerd_config`] writes containerd's config for ontop.

pub mod backend;
pub mod base;
pub mod bench;
pub mod caller;
pub mod check;
pub mod client;
pub mod config;
pub mod containerd_config;
pub mod error;
pub mod filter;
pub mod grpc;
pub mod idmap;
pub mod labels;
pub mod layout;
pub mod metrics;
pub mod mounter;
pub mod mounts;
pub mod pin;
pub mod server;
pub mod snapshot;
pub mod snapshotter;
pub mod store;
pub mod systemd;
pub mod usage;
pub mod watch;

/// ontop's own `ontop.v1` admin API.
pub mod admin {
    pub mod v1 {
        tonic::include_proto!("ontop.v1");
    }
}

/// containerd's Snapshots API, compiled from the protos of containerd
/// v2.3.4 vendored in `proto/containerd/`.
pub mod containerd_api {
    /// The modules nest as the proto packages do, because prost refers
    /// from one package to another by relative path.
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
    pub use containerd::services::snapshots;
    pub use containerd::types;
}
