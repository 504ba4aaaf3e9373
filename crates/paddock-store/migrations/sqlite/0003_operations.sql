-- Operations: journaled state machines (balanced deployment), their steps, and the zone locks
-- that let one operation at a time act on a zone.
CREATE TABLE operations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT NOT NULL,
    state           TEXT NOT NULL,
    zones           TEXT NOT NULL,
    plan            TEXT NOT NULL,
    abort_requested BIGINT NOT NULL DEFAULT 0,
    message         TEXT,
    created_ms      BIGINT NOT NULL,
    updated_ms      BIGINT NOT NULL,
    ended_ms        BIGINT
);
CREATE TABLE operation_steps (
    op_id      BIGINT NOT NULL REFERENCES operations (id),
    zone       TEXT NOT NULL,
    step       TEXT NOT NULL,
    ordinal    BIGINT NOT NULL,
    servers    TEXT NOT NULL,
    state      TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    ended_ms   BIGINT,
    attempts   BIGINT NOT NULL DEFAULT 1,
    facts      TEXT NOT NULL DEFAULT '[]',
    message    TEXT,
    PRIMARY KEY (op_id, zone, step)
);
CREATE TABLE zone_locks (
    zone  TEXT PRIMARY KEY,
    op_id BIGINT NOT NULL REFERENCES operations (id)
);
