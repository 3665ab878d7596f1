-- Data planes known to the cluster (Kong's clustering_data_planes), written by every control
-- plane that has the DP connected.
CREATE TABLE dp_data_planes (
    node_id       TEXT PRIMARY KEY,
    hostname      TEXT NOT NULL,
    address       TEXT NOT NULL,
    kong_version  TEXT NOT NULL,
    protocol      TEXT NOT NULL,
    version       BIGINT NOT NULL,
    state_hash    TEXT,
    connected_to  TEXT,
    last_seen     BIGINT NOT NULL,
    last_error    TEXT,
    labels        TEXT NOT NULL DEFAULT '{}',
    capabilities  TEXT NOT NULL DEFAULT '[]',
    cert_expiry   BIGINT
);
