-- fnq datastore, version 2 (SQLite): the live worker registry behind `fnq status`.
-- Each worker upserts its row every few seconds (seen_at) and deletes it on a clean
-- shutdown; rows of workers that died are left to prune_workers.

CREATE TABLE workers (
    id         TEXT    PRIMARY KEY,
    host       TEXT    NOT NULL,
    pid        INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    seen_at    INTEGER NOT NULL,
    info       TEXT    NOT NULL
);

CREATE INDEX workers_by_seen ON workers (seen_at);
