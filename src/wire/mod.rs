//! The wire: bytes and connections, knowing nothing of limits or policy.
//!
//! Owns the listeners' connection bounds ([`conn`]), TLS ([`tls`]), the
//! HTTP/1.1 header-case writer ([`header_case`]), the request target's normal
//! form ([`path`]), body wrappers and media-type helpers ([`body`]) and the
//! pooled upstream client ([`upstream`]).
//!
//! May import: [`crate::clock`] only.

pub mod body;
pub mod client;
pub mod conn;
pub mod header_case;
pub mod path;
pub mod tls;
pub mod upstream;
