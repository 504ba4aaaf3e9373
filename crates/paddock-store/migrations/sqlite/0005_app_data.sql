-- App data, written by the apps through wasi:keyvalue on any front-end: the values of the apps'
-- buckets and of their users' sessions, and the sessions with their expiry.
CREATE TABLE app_sessions (
    app        TEXT NOT NULL,
    id         TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    PRIMARY KEY (app, id)
);
CREATE INDEX app_sessions_expiry ON app_sessions (expires_ms);
-- `scope` is 'b:' and a bucket name, or 's:' and a session id.
CREATE TABLE app_values (
    app   TEXT NOT NULL,
    scope TEXT NOT NULL,
    key   TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (app, scope, key)
);
