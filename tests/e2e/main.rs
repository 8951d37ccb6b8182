//! End-to-end tests: the real `leadrelay` binary, its services talking real gRPC over loopback,
//! probed the way operators and peers do.

mod cli;
mod crash;
mod hana_ingest;
mod metrics;
mod operations;
mod pipedrive;
mod pipedrive_ingest;
mod pipedrive_poll;
mod salesman_hana;
mod salesman_poll;
mod secrets;
mod support;
mod sync_crash;
mod sync_flow;
mod traces;
mod up;
