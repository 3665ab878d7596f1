//! `kong.sync.v2` (Kong's incremental sync) and our `deltaplane.sync.v1` extension, typed:
//! method names, params and results as both planes send and read them.

/// The data plane asks for the deltas after its version (also sent as a notification: a
/// status report).
pub const GET_DELTA: &str = "kong.sync.v2.get_delta";
/// The control plane announces a new head.
pub const NOTIFY_NEW_VERSION: &str = "kong.sync.v2.notify_new_version";
/// The data plane reports deltas it rejected.
pub const NOTIFY_VALIDATION_ERROR: &str = "kong.sync.v2.notify_validation_error";
/// One page of a paged transfer (ours; only called on a peer that announced
/// [`super::CAP_DELTAPLANE_SYNC_V1`]).
pub const GET_PAGE: &str = "deltaplane.sync.v1.get_page";
