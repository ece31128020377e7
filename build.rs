//! Compiles `proto/` into Rust with a pure-Rust protobuf compiler (protox), so
//! a build needs no system `protoc`. The same descriptor set is written to
//! `OUT_DIR` for server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "identity/v1/user.proto",
    "identity/v1/group.proto",
    "identity/v1/auth.proto",
    "identity/v1/account.proto",
    "identity/v1/change.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let fds = protox::compile(PROTOS, ["proto"])?;
    fs::write(out_dir.join("identity_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
