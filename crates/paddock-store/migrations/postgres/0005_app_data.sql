-- App data, written by the apps through wasi:keyvalue on any front-end: the values of the apps'
-- buckets, their users' sessions, and the values of each session, gone with it.
CREATE TABLE app_values (
    app    TEXT NOT NULL,
    bucket TEXT NOT NULL,
    key    TEXT NOT NULL,
    value  BYTEA NOT NULL,
    PRIMARY KEY (app, bucket, key)
);
CREATE TABLE app_sessions (
    app        TEXT NOT NULL,
    id         TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    PRIMARY KEY (app, id)
);
CREATE INDEX app_sessions_expiry ON app_sessions (expires_ms);
CREATE TABLE session_values (
    app     TEXT NOT NULL,
    session TEXT NOT NULL,
    key     TEXT NOT NULL,
    value   BYTEA NOT NULL,
    PRIMARY KEY (app, session, key),
    FOREIGN KEY (app, session) REFERENCES app_sessions (app, id) ON DELETE CASCADE
);
