//! LeadRelay Hana adapter: Hana's update API behind gRPC
