//! Keys: who is calling.
//!
//! Owns how an API key is found in a request and resolved to an account and a
//! plan ([`identity`]), and the keys created at run time through the admin API
//! with their cache and durable stores ([`runtime`]).
//!
//! May import: [`crate::store`] (the shared Redis connection, key digests),
//! [`crate::content`], [`crate::wire`], [`crate::limits`], [`crate::clock`].

pub mod cache;
pub mod digest;
pub mod identity;
pub mod runtime;
