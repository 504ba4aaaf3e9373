-- Platform upgrades: the builds of the `paddock` executable the controller keeps (the files are
-- in its data folder), and the build each server is told to run.
CREATE TABLE platform_builds (
    sha256      TEXT PRIMARY KEY,
    version     TEXT NOT NULL,
    size        BIGINT NOT NULL,
    uploaded_ms BIGINT NOT NULL
);
ALTER TABLE servers ADD COLUMN platform_target TEXT;
-- The generation that set it: a front-end retries a failed install at once for a new one.
ALTER TABLE servers ADD COLUMN platform_target_generation BIGINT;
