//! turnstile: a rate-limiting reverse proxy for generation APIs.
//!
//! The binary is a thin shell over this library so tests can start the real
//! server in-process with a fake clock. The modules are layers, bottom
//! first; each imports only those below it (docs/architecture.md;
//! `tools/layout.py` checks it):
//!
//! [`clock`] → [`wire`] → [`limits`] → [`store`] → [`content`] → [`keys`] →
//! [`respond`] → [`observe`] → [`capacity`] → [`jobs`] → [`ledger`] → [`config`] →
//! [`pipeline`] → [`admin`] / [`decision`] → [`server`] → [`cli`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![warn(unreachable_pub)]

pub mod admin;
pub mod capacity;
pub mod cli;
pub mod clock;
pub mod config;
pub mod content;
pub mod decision;
pub mod jobs;
pub mod keys;
pub mod ledger;
pub mod limits;
pub mod observe;
pub mod pipeline;
pub mod respond;
pub mod server;
pub mod store;
pub mod wire;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{load, ConfigError, Policy};
pub use server::Server;
