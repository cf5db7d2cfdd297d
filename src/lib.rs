//! tsunagu (繋ぐ): the image-exchange hub of a regional hospital network.
//!
//! Data flows one way:
//!
//! ```text
//! modality/PACS --C-STORE--> dimse --> ingest --> store (local dir | S3)
//!                                          \--> index (SQLite | PostgreSQL)
//! admin --import/reindex--> cli --> ingest / hub
//! probes --HTTP--> web (healthz, readyz, metrics)
//! ```
//!
//! `dicom` is pure vocabulary; `store` and `index` know nothing of the wire;
//! errors become wire answers only in `dimse::status` (and `web` for HTTP).

pub mod access;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dicom;
pub mod dimse;
pub mod hub;
pub mod imaging;
pub mod index;
pub mod ingest;
pub mod listen;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod web;
