//! Compiles containerd's Snapshots and Diff APIs and ontop's own `ontop.v1` admin
//! service with the same tonic, so both share one server; and a client of
//! CRI's `runtime.v1` API for the tests, which only they include (the
//! daemon never links it). Where each proto comes from: proto/README.md.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[
                "proto/containerd/github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto",
                "proto/containerd/github.com/containerd/containerd/api/services/diff/v1/diff.proto",
                "proto/ontop/v1/admin.proto",
            ],
            &["proto/containerd", "proto"],
        )?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_protos(
            &["proto/cri/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto"],
            &["proto/cri"],
        )?;
    Ok(())
}
