//! LeadRelay orchestrator: durable store, event ingest, sync jobs and the admin API
