//! HTTP: operations endpoints now; DICOMweb and the admin API mount here.

pub mod ops;

use std::sync::Arc;

use axum::Router;

use crate::hub::Hub;

/// The whole HTTP application.
pub fn router(hub: Arc<Hub>) -> Router {
    ops::router().with_state(hub)
}
