//! Observation: what turnstile tells operators about the traffic it sees.
//!
//! Owns the Prometheus metrics ([`metrics`]), the access log
//! ([`access_log`]), the sampled refusal log ([`refusal_log`]) and the
//! most-refused keys ([`top_refused`]), the last 15 minutes for the
//! dashboard's charts ([`history`]). Nothing here decides anything.
//!
//! May import: [`crate::respond`] (refusal codes), [`crate::wire`],
//! [`crate::clock`].

pub mod access_log;
pub mod capacity;
pub mod history;
mod label;
pub mod ledger;
pub mod metrics;
pub mod otlp_metrics;
pub mod refusal_log;
pub mod top_refused;
pub mod trace;
