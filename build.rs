//! Compiles containerd's Snapshots API (vendored from containerd v2.3.4
//! in `proto/containerd/`, see its README) and ontop's own `ontop.v1`
//! admin service, with the same tonic, so both share one server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[
                "proto/containerd/services/snapshots/v1/snapshots.proto",
                "proto/ontop/v1/admin.proto",
            ],
            &["proto/containerd", "proto"],
        )?;
    Ok(())
}
