//! The runtime every LeadRelay service shares: settings ([`config`]), logs and traces
//! ([`telemetry`], [`propagation`]), the gRPC server bootstrap with health and reflection
//! ([`grpc`]), the config file's routes and field mappings ([`routes`], [`mappings`]), graceful
//! shutdown ([`shutdown`]) and what every adapter answers before its logic
//! exists or while its credentials are missing ([`adapter`]).

pub mod adapter;
pub mod config;
pub mod grpc;
pub mod mappings;
pub mod metrics;
pub mod outbound;
pub mod propagation;
pub mod routes;
pub mod shutdown;
pub mod telemetry;

pub use config::{ConfigError, Settings};
