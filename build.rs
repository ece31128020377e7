//! Compiles `proto/` into Rust with a pure-Rust protobuf compiler (protox), so
//! a build needs no system `protoc`. The same descriptor set is written to
//! `OUT_DIR` for server reflection, and beside it the descriptor set of
//! Envoy's `ext_authz` service, compiled from the protos the `envoy-types`
//! crate publishes (its Rust types serve the RPC; reflection needs the
//! descriptors, which the crate does not export).

use std::{env, fs, path::PathBuf, process::Command};

use prost::Message;

const PROTOS: &[&str] = &[
    "identity/v1/user.proto",
    "identity/v1/group.proto",
    "identity/v1/auth.proto",
    "identity/v1/account.proto",
    "identity/v1/change.proto",
    "identity/v1/api_key.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let fds = protox::compile(PROTOS, ["proto"])?;
    fs::write(out_dir.join("identity_descriptor.bin"), fds.encode_to_vec())?;

    let envoy = envoy_protos()?;
    println!("cargo:rerun-if-changed={}", envoy.display());
    let includes = [
        "data-plane-api",
        "xds",
        "googleapis",
        "protoc-gen-validate",
        "cel-spec/proto",
        "opentelemetry-proto",
        "client_model",
    ]
    .map(|dir| envoy.join(dir));
    let envoy_fds = protox::compile(["envoy/service/auth/v3/external_auth.proto"], includes)?;
    fs::write(
        out_dir.join("envoy_descriptor.bin"),
        envoy_fds.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}

/// The `proto` folder of the `envoy-types` crate this build uses, found
/// with `cargo metadata` (wherever cargo keeps it: registry, vendor folder).
/// Filtered to the target platform, and offline first: a first build
/// downloads only the packages it compiles, and metadata also lists those
/// behind a `cfg` this target does not meet (portable-atomic), so when the
/// offline try lacks one, cargo is asked again, allowed to fetch it.
fn envoy_protos() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let cargo = env::var("CARGO")?;
    let target = env::var("TARGET")?;
    let metadata = |offline: bool| -> Result<std::process::Output, std::io::Error> {
        let mut cmd = Command::new(&cargo);
        cmd.args(["metadata", "--format-version", "1", "--locked"])
            .args(["--filter-platform", &target])
            .current_dir(env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
        if offline {
            cmd.arg("--offline");
        }
        cmd.output()
    };
    let mut output = metadata(true)?;
    if !output.status.success() {
        output = metadata(false)?;
    }
    if !output.status.success() {
        return Err(format!(
            "cargo metadata: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let manifest = metadata["packages"]
        .as_array()
        .and_then(|packages| {
            packages
                .iter()
                .find(|p| p["name"] == "envoy-types")
                .and_then(|p| p["manifest_path"].as_str())
        })
        .ok_or("cargo metadata lists no envoy-types package")?;
    let dir = PathBuf::from(manifest)
        .parent()
        .ok_or("envoy-types' manifest has no folder")?
        .join("proto");
    Ok(dir)
}
