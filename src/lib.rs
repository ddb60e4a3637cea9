//! detour: an LLM gateway that routes around provider outages.
//!
//! See ARCHITECTURE.md for the code map and the path of a request.

pub mod admin;
pub mod auth;
pub mod budget;
pub mod cache;
pub mod clock;
pub mod config;
pub mod demo;
pub mod dns;
pub mod error;
pub mod health;
pub mod incidents;
pub mod ingress;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod mock;
pub mod protocol;
pub mod providers;
pub mod proxy;
pub mod relay;
pub mod reload;
pub mod request;
pub mod rollout;
pub mod routing;
pub mod server;
pub mod state;
pub mod status_page;
pub mod statuspage;
pub mod telemetry;
pub mod timefmt;
pub mod upstream;
