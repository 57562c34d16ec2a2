#![doc = include_str!("../README.md")]
//! The `tocsin.v1` wire protocol: prost messages and tonic stubs generated from
//! `proto/tocsin/v1/tocsin.proto` at build time. This crate owns only the wire format;
//! each daemon converts to its own domain types at its edge.

#[allow(clippy::all, reason = "generated code from tonic-prost-build")]
pub mod v1 {
    tonic::include_proto!("tocsin.v1");
}

/// Limits both ends enforce: the agent refuses configs that would exceed them, the
/// aggregator refuses messages that do.
pub mod limits {
    /// Longest identifier (agent id, hostname, check name, label key or value), bytes.
    pub const MAX_ID_LEN: usize = 256;
    /// Longest event message, bytes; longer ones are truncated.
    pub const MAX_MESSAGE_LEN: usize = 4096;
    /// Most labels on a node or a check.
    pub const MAX_LABELS: usize = 32;
}

/// The protocol version string agents and aggregators log on connect.
pub const PROTOCOL: &str = "tocsin.v1";
