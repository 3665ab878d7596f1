-- The cluster certificate each control plane presents (SHA-256 of the leaf, and the mTLS
-- mode), so control planes sharing one database can tell when data planes could not fail
-- over between them (shared mode pins one certificate).
CREATE TABLE dp_cluster_certs (
    node_id TEXT PRIMARY KEY,
    mtls_mode TEXT NOT NULL,
    cert_digest TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Named marks a control plane keeps: `revalidated_with` is the fingerprint of the schema
-- files the stored entities were last validated against (see `Store::revalidate`).
CREATE TABLE dp_marks (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
