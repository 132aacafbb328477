//! The binary's commands that are more than wiring: the bundled example API
//! ([`example_api`]) and the `turnstile keys` client ([`keys`]).
//!
//! May import anything below it; nothing imports it.

pub mod example_api;
pub mod keys;
