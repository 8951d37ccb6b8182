//! LeadRelay's gRPC contracts, generated from `proto/leadrelay/**.proto`.
//!
//! - [`v1`]: the canonical model, `CrmSyncService` (implemented by every adapter) and
//!   `OrchestratorService`.
//! - [`hana::v1`], [`pipedrive::v1`], [`salesman::v1`]: each adapter's native API.

#![allow(
    unreachable_pub,
    clippy::doc_lazy_continuation,
    clippy::large_enum_variant
)]

mod hana_events;
pub mod json;

/// `leadrelay.v1`: the canonical model, `CrmSyncService` and `OrchestratorService`.
pub mod v1 {
    tonic::include_proto!("leadrelay.v1");
}

/// `leadrelay.hana.v1`: Hana's native API.
pub mod hana {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("leadrelay.hana.v1");
    }
}

/// `leadrelay.pipedrive.v1`: Pipedrive's native API.
pub mod pipedrive {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("leadrelay.pipedrive.v1");
    }
}

/// `leadrelay.salesman.v1`: SalesMan's native API.
pub mod salesman {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("leadrelay.salesman.v1");
    }
}

/// Encoded `FileDescriptorSet` of every LeadRelay contract, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/leadrelay_descriptor.bin"));

/// Fully-qualified gRPC service names, as health checks and reflection know them.
pub mod service_names {
    /// `leadrelay.v1.OrchestratorService`.
    pub const ORCHESTRATOR: &str = "leadrelay.v1.OrchestratorService";
    /// `leadrelay.v1.CrmSyncService`.
    pub const CRM_SYNC: &str = "leadrelay.v1.CrmSyncService";
    /// `leadrelay.hana.v1.HanaAdapterService`.
    pub const HANA_ADAPTER: &str = "leadrelay.hana.v1.HanaAdapterService";
    /// `leadrelay.pipedrive.v1.PipedriveAdapterService`.
    pub const PIPEDRIVE_ADAPTER: &str = "leadrelay.pipedrive.v1.PipedriveAdapterService";
    /// `leadrelay.salesman.v1.SalesManAdapterService`.
    pub const SALESMAN_ADAPTER: &str = "leadrelay.salesman.v1.SalesManAdapterService";
}
