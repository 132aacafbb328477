//! turnstile behind the gateway you already run (`[decision]`): an HTTP
//! decision endpoint for forward auth (Traefik, Caddy), Envoy `ext_authz`
//! and nginx `auth_request` ([`http`]), and Envoy's rate limit service
//! over gRPC ([`grpc`]). Both ask the pipeline for a verdict on a request
//! they describe; neither forwards anything.
//!
//! May import everything below it: the pipeline and the layers under it.

pub mod grpc;
pub mod http;

/// The Envoy API's messages and service, compiled from `proto/` at build time.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod proto {
    /// `envoy.*` packages.
    pub mod envoy {
        /// `envoy.config`.
        pub mod config {
            /// `envoy.config.core`.
            pub mod core {
                /// `envoy.config.core.v3`.
                pub mod v3 {
                    tonic::include_proto!("envoy.config.core.v3");
                }
            }
        }
        /// `envoy.extensions`.
        pub mod extensions {
            /// `envoy.extensions.common`.
            pub mod common {
                /// `envoy.extensions.common.ratelimit`.
                pub mod ratelimit {
                    /// `envoy.extensions.common.ratelimit.v3`.
                    pub mod v3 {
                        tonic::include_proto!("envoy.extensions.common.ratelimit.v3");
                    }
                }
            }
        }
        /// `envoy.type`.
        pub mod r#type {
            /// `envoy.type.v3`.
            pub mod v3 {
                tonic::include_proto!("envoy.r#type.v3");
            }
        }
        /// `envoy.service`.
        pub mod service {
            /// `envoy.service.ratelimit`.
            pub mod ratelimit {
                /// `envoy.service.ratelimit.v3`.
                pub mod v3 {
                    tonic::include_proto!("envoy.service.ratelimit.v3");
                }
            }
        }
    }
}
