//! Wire formats, as pure functions over bytes and types.
//!
//! Architecture invariant: nothing in `protocol` does I/O or knows about tokio,
//! HTTP clients or the gateway's state. It is the most-tested part of detour and
//! must build and test fast.

pub mod chat;
pub mod openai;
pub mod sse;
pub mod translate;
