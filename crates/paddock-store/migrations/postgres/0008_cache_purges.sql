-- The purge log: every front-end reads it to drop the responses it keeps for an app (all of
-- them, or those with a tag), so that a purge reaches the whole farm without the controller.
-- Rows are written one writer at a time, so that ids become visible in order; the controller
-- forgets rows older than an hour.
CREATE TABLE cache_purges (
    id     BIGSERIAL PRIMARY KEY,
    app    TEXT NOT NULL,
    -- NULL: every response of the app.
    tag    TEXT,
    at_ms  BIGINT NOT NULL,
    -- Who asked: "admin", or the server whose app answered with a purge.
    source TEXT NOT NULL
);
