//! LeadRelay gateway: turns Hana and Pipedrive webhooks into orchestrator gRPC calls
