//! Compiles ontop's own `ontop.v1` admin service. containerd's Snapshots
//! service comes compiled from the `containerd-snapshots` crate, built with
//! the same tonic version, so both share one server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ontop/v1/admin.proto");
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile(&["proto/ontop/v1/admin.proto"], &["proto"])?;
    Ok(())
}
