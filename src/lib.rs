//! turnstile: a rate-limiting reverse proxy for generation APIs.
//!
//! The binary is a thin shell over this library so tests can start the real
//! server in-process with a fake clock. Modules follow the request pipeline
//! of one request (docs/architecture.md): [`config`] → [`routing`] → [`identity`] → [`limits`] /
//! [`store`] → [`proxy`] → [`responses`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![warn(unreachable_pub)]

pub mod access_log;
pub mod admin;
pub mod answer;
pub mod body;
pub mod clock;
pub mod conditions;
pub mod config;
pub mod conn;
pub mod cost;
pub mod decode;
pub mod example_api;
pub mod header_case;
pub mod identity;
pub mod inspect;
pub mod jobs;
pub mod json;
pub mod keys_cli;
pub mod keystore;
pub mod limits;
pub mod mcp;
pub mod media;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod refusal_log;
pub mod responses;
pub mod routing;
pub mod server;
pub mod store;
pub mod tap;
pub mod tls;
pub mod top_refused;
pub mod upstream;
pub mod urls;
pub mod usage;
pub mod values;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{load, ConfigError, Policy};
pub use server::Server;
