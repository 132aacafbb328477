//! Content: what is read from requests and answers, and how.
//!
//! Owns strict JSON and the pointer lookup ([`json`]), content codings
//! ([`decode`]), the answer tap ([`tap`]), value sources ([`values`]) and what
//! is built on them ([`conditions`], [`cost`]), MCP's JSON-RPC envelope
//! ([`mcp`]), media probing ([`media`]), URLs in bodies ([`urls`]) and route
//! patterns ([`routing`]). Every reader here either returns the value the
//! upstream would read or says it cannot.
//!
//! May import: [`crate::wire`], [`crate::clock`].

pub mod conditions;
pub mod cost;
pub mod decode;
pub mod json;
pub mod mcp;
pub mod media;
pub mod routing;
pub mod tap;
pub mod urls;
pub mod values;
