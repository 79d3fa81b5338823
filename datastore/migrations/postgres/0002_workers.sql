-- fnq datastore, version 2 (PostgreSQL): the live worker registry behind `fnq status`.
-- Each worker upserts its row every few seconds (seen_at) and deletes it on a clean
-- shutdown; rows of workers that died are left to prune_workers.

CREATE TABLE workers (
    id         text        PRIMARY KEY,
    host       text        NOT NULL,
    pid        integer     NOT NULL,
    started_at timestamptz NOT NULL,
    seen_at    timestamptz NOT NULL,
    info       text        NOT NULL
);

CREATE INDEX workers_by_seen ON workers (seen_at);
