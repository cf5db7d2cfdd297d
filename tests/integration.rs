//! The one integration test binary (see STYLE.md): real peers, real services,
//! skipping out loud when one is missing.

mod bad_input;
mod cli;
mod common;
mod consent;
mod consent_model;
mod dicomweb;
mod dicomweb_peers;
mod dimse;
mod durability;
mod images;
mod ingest_facts;
mod ops;
mod tls;
mod viewer;
