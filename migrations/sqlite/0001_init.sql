-- deltaplane control-plane store, SQLite.
-- The meta row (id = 1) is the version lock: every write transaction updates it first.
CREATE TABLE dp_meta (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    version     INTEGER NOT NULL,
    epoch       TEXT    NOT NULL,
    state_hash  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
);

-- Every entity of every type; the body is canonical JSON (sorted keys).
CREATE TABLE dp_entities (
    type   TEXT NOT NULL,
    id     TEXT NOT NULL,
    ws_id  TEXT NOT NULL,
    body   TEXT NOT NULL,
    PRIMARY KEY (type, id)
);

-- Unique fields, endpoint keys and cache keys: (type, ws, key name, canonical value) -> id.
CREATE TABLE dp_keys (
    type   TEXT NOT NULL,
    ws_id  TEXT NOT NULL,
    name   TEXT NOT NULL,
    value  TEXT NOT NULL,
    id     TEXT NOT NULL,
    PRIMARY KEY (type, ws_id, name, value)
);
CREATE INDEX dp_keys_by_id ON dp_keys (type, id);

-- Foreign references, child -> parent, for nested listing and delete rules.
CREATE TABLE dp_refs (
    parent_type TEXT NOT NULL,
    parent_id   TEXT NOT NULL,
    child_type  TEXT NOT NULL,
    field       TEXT NOT NULL,
    child_id    TEXT NOT NULL,
    PRIMARY KEY (parent_type, parent_id, child_type, field, child_id)
);
CREATE INDEX dp_refs_by_child ON dp_refs (child_type, child_id);

CREATE TABLE dp_tags (
    type  TEXT NOT NULL,
    tag   TEXT NOT NULL,
    id    TEXT NOT NULL,
    PRIMARY KEY (type, tag, id)
);
CREATE INDEX dp_tags_by_id ON dp_tags (type, id);

-- The change log: one row per version, one row per delta.
CREATE TABLE dp_versions (
    version     INTEGER PRIMARY KEY,
    state_hash  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    n_deltas    INTEGER NOT NULL
);

CREATE TABLE dp_changes (
    version  INTEGER NOT NULL,
    seq      INTEGER NOT NULL,
    type     TEXT    NOT NULL,
    pk       TEXT    NOT NULL,
    ws_id    TEXT    NOT NULL,
    entity   TEXT,
    PRIMARY KEY (version, seq)
);
