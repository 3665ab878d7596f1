-- Kong's clustering_data_planes fields beyond what sync v2 needed: sync_status (Kong's values),
-- config_hash (a v1 md5 or a v2 version string) and updated_at.
ALTER TABLE dp_data_planes ADD COLUMN sync_status TEXT NOT NULL DEFAULT 'unknown';
ALTER TABLE dp_data_planes ADD COLUMN config_hash TEXT;
ALTER TABLE dp_data_planes ADD COLUMN updated_at BIGINT NOT NULL DEFAULT 0;
CREATE INDEX dp_data_planes_last_seen ON dp_data_planes (last_seen);
