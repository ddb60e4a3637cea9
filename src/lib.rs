//! detour: an LLM gateway that routes around provider outages.
//!
//! See ARCHITECTURE.md for the code map and the path of a request.
//!
//! The pure wire formats and the fake providers are crates of their own in this
//! workspace (`crates/detour-protocol`, `crates/detour-mock`). The gateway names
//! them by their module names, `crate::protocol::…` and `detour::mock::…`, through
//! the two re-exports below.

pub use detour_mock as mock;
pub use detour_protocol as protocol;

pub mod access;
pub mod admin;
pub mod after_write;
pub mod auth;
pub mod boxed;
pub mod budget;
pub mod cache;
pub mod clock;
pub mod config;
pub mod demo;
pub mod dns;
pub mod drill;
pub mod error;
pub mod health;
pub mod health_sync;
pub mod incidents;
pub mod ingress;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod providers;
pub mod proxy;
pub mod public_status;
pub mod relay;
pub mod reload;
pub mod request;
pub mod rollout;
pub mod routing;
pub mod server;
pub mod shared;
pub mod state;
pub mod status_pages;
pub mod telemetry;
pub mod traces;
pub mod upstream;
pub mod when_woken;
pub mod workers;
