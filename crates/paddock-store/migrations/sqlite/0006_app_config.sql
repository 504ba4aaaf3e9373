-- Run-time overrides of apps' [config]: set by the operator, laid over the manifest's values of
-- whichever version runs, without a new version.
CREATE TABLE app_config (
    app   TEXT NOT NULL,
    key   TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (app, key)
);
