//! LeadRelay Pipedrive adapter: Pipedrive API v2 behind gRPC
