//! detour: an LLM gateway that routes around provider outages.
//!
//! See ARCHITECTURE.md for the code map and the path of a request.

pub mod auth;
pub mod config;
pub mod demo;
pub mod error;
pub mod ingress;
pub mod mock;
pub mod protocol;
pub mod providers;
pub mod proxy;
pub mod relay;
pub mod routing;
pub mod server;
pub mod state;
pub mod telemetry;
pub mod upstream;
