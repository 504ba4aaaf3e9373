-- Paddock platform database, SQLite. Timestamps are milliseconds since the Unix epoch; flags are 0/1.
CREATE TABLE servers (
    name             TEXT PRIMARY KEY,
    zone             TEXT NOT NULL,
    address          TEXT NOT NULL,
    platform_version TEXT NOT NULL,
    engine           TEXT NOT NULL,
    role             TEXT NOT NULL DEFAULT 'active',
    deployment_on    BIGINT NOT NULL DEFAULT 1,
    scheduler_on     BIGINT NOT NULL DEFAULT 1,
    registered_ms    BIGINT NOT NULL,
    heartbeat_ms     BIGINT,
    observed         TEXT
);
CREATE TABLE blobs (
    sha256 TEXT PRIMARY KEY,
    size   BIGINT NOT NULL,
    bytes  BLOB NOT NULL
);
CREATE TABLE versions (
    app              TEXT NOT NULL,
    version          TEXT NOT NULL,
    zone             TEXT NOT NULL,
    manifest         TEXT NOT NULL,
    component_sha256 TEXT NOT NULL REFERENCES blobs (sha256),
    created_ms       BIGINT NOT NULL,
    PRIMARY KEY (app, version)
);
CREATE TABLE artifacts (
    component_sha256 TEXT NOT NULL,
    engine           TEXT NOT NULL,
    artifact_sha256  TEXT NOT NULL,
    bytes            BLOB NOT NULL,
    PRIMARY KEY (component_sha256, engine)
);
CREATE TABLE desired (
    app        TEXT NOT NULL,
    zone       TEXT NOT NULL,
    version    TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (app, zone)
);
CREATE TABLE generation (
    id    BIGINT PRIMARY KEY CHECK (id = 1),
    value BIGINT NOT NULL
);
INSERT INTO generation (id, value) VALUES (1, 1);
CREATE TABLE audit (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms  BIGINT NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
