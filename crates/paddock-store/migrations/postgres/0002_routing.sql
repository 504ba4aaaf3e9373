-- Routing: how balancers treat each front-end, each zone's policy, and the balancers' acknowledgements.
ALTER TABLE servers ADD COLUMN lb TEXT NOT NULL DEFAULT 'ready';
ALTER TABLE servers ADD COLUMN weight BIGINT NOT NULL DEFAULT 1;
CREATE TABLE zones (
    zone   TEXT PRIMARY KEY,
    policy TEXT NOT NULL
);
CREATE TABLE balancers (
    name         TEXT PRIMARY KEY,
    report       TEXT NOT NULL,
    generation   BIGINT NOT NULL,
    applied_ms   BIGINT NOT NULL,
    heartbeat_ms BIGINT NOT NULL
);
