//! The code generated from `proto/` (in `OUT_DIR`, never in `src/`), and its
//! descriptor set for server reflection.

/// Package `identity.v1`.
pub mod identity {
    /// Version 1 of the API.
    #[allow(clippy::all, clippy::pedantic, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("identity.v1");
    }
}

/// The encoded `FileDescriptorSet` of `proto/`, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/identity_descriptor.bin"));

/// The encoded `FileDescriptorSet` of Envoy's `envoy.service.auth.v3`
/// (the ext_authz Check), compiled from the protos `envoy-types` publishes,
/// for reflection.
pub const ENVOY_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptor.bin"));
