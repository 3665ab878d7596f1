//! Cluster mTLS: certificate generation and rustls configurations for Kong's `shared` and `pki`
//! modes.
