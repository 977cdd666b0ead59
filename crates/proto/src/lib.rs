//! The one crate that turns `proto/` into Rust. It re-exports `tonic` and `prost` so every service
//! and client uses the same versions.

pub use prost;
pub use tonic;

/// `tandem.ann.v1`: the ANN host.
pub mod ann {
    pub mod v1 {
        tonic::include_proto!("tandem.ann.v1");
    }
}

/// `tandem.usertower.v1`: the user-tower service.
pub mod usertower {
    pub mod v1 {
        tonic::include_proto!("tandem.usertower.v1");
    }
}

/// `tandem.homefeed.v1`: the homefeed orchestrator.
pub mod homefeed {
    pub mod v1 {
        tonic::include_proto!("tandem.homefeed.v1");
    }
}

/// Encoded `FileDescriptorSet` of every Tandem proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tandem_descriptor.bin"));
