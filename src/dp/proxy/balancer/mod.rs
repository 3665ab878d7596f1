//! Upstreams, targets and DNS.
