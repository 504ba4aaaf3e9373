-- Timers of the desired app versions, claimed by the front-ends' scheduler services with a
-- lease and a fencing token, and the history of their runs.
CREATE TABLE timers (
    app         TEXT NOT NULL,
    timer       TEXT NOT NULL,
    zone        TEXT NOT NULL,
    version     TEXT NOT NULL,
    schedule    TEXT NOT NULL,
    path        TEXT NOT NULL,
    anchor_ms   BIGINT NOT NULL,
    next_ms     BIGINT NOT NULL,
    fencing     BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until BIGINT,
    tick_ms     BIGINT,
    PRIMARY KEY (app, timer)
);
CREATE TABLE timer_runs (
    id BIGSERIAL PRIMARY KEY,
    app        TEXT NOT NULL,
    timer      TEXT NOT NULL,
    server     TEXT NOT NULL,
    tick_ms    BIGINT NOT NULL,
    fencing    BIGINT NOT NULL,
    retry      BIGINT NOT NULL,
    started_ms BIGINT NOT NULL,
    ended_ms   BIGINT,
    outcome    TEXT NOT NULL,
    detail     TEXT
);
CREATE INDEX timer_runs_by_timer ON timer_runs (app, timer, id);
