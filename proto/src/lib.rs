#![doc = include_str!("../README.md")]
//! The `tocsin.v1` wire protocol: prost messages and tonic stubs generated from
//! `proto/tocsin/v1/tocsin.proto` at build time. This crate owns only the wire format;
//! each daemon converts to its own domain types at its edge.

#[allow(clippy::all, reason = "generated code from tonic-prost-build")]
pub mod v1 {
    tonic::include_proto!("tocsin.v1");
}

/// The protocol version string agents and aggregators log on connect.
pub const PROTOCOL: &str = "tocsin.v1";
