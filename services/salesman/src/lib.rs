//! LeadRelay SalesMan adapter: SalesMan leads API v1 behind gRPC
