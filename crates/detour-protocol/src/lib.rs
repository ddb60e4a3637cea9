//! detour's wire formats, as pure functions over bytes and types: request checks
//! and error bodies (`openai`), the one IR (`chat`), translation between the
//! OpenAI, Anthropic and Gemini formats (`translate`), SSE event framing (`sse`),
//! and RFC 3339 time stamps (`timefmt`). The gateway re-exports this crate as
//! `detour::protocol`.
//!
//! Architecture invariant: nothing here does I/O or knows about tokio, HTTP
//! clients or the gateway's state. It is the most-tested part of detour and must
//! build and test fast: `cargo test -p detour-protocol` compiles only this crate's
//! own few dependencies, and CI (`.ci/run`) fails if an async runtime, an HTTP
//! crate or another detour crate enters its dependency tree.

pub mod chat;
pub mod json_check;
pub mod openai;
pub mod sse;
pub mod timefmt;
pub mod translate;
