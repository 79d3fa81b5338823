-- fnq datastore, version 1 (SQLite). Times are microseconds since the Unix epoch (UTC).

CREATE TABLE fns (
    app             TEXT    NOT NULL,
    name            TEXT    NOT NULL,
    image           TEXT    NOT NULL,
    memory_mb       INTEGER NOT NULL,
    cpus_mcpu       INTEGER NOT NULL,
    timeout_s       INTEGER NOT NULL,
    idle_timeout_s  INTEGER NOT NULL,
    tmpfs_mb        INTEGER NOT NULL,
    config          TEXT    NOT NULL,
    max_attempts    INTEGER NOT NULL,
    retry_backoff_s REAL    NOT NULL,
    max_age_s       INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (app, name)
);

CREATE TABLE calls (
    id                 TEXT    PRIMARY KEY,
    app                TEXT    NOT NULL,
    fn                 TEXT    NOT NULL,
    image              TEXT,
    status             TEXT    NOT NULL,
    error              TEXT,
    failure            TEXT,
    attempts           INTEGER NOT NULL DEFAULT 0,
    created_at         INTEGER NOT NULL,
    started_at         INTEGER,
    completed_at       INTEGER,
    updated_at         INTEGER NOT NULL,
    next_try_at        INTEGER,
    worker_id          TEXT,
    container_id       TEXT,
    response_status    INTEGER,
    response_headers   TEXT,
    response_body      BLOB,
    response_truncated INTEGER NOT NULL DEFAULT 0,
    log_truncated      INTEGER NOT NULL DEFAULT 0,
    stats              TEXT,
    cancel_requested   INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX calls_by_fn ON calls (app, fn, id);
CREATE INDEX calls_by_status ON calls (status, id);
CREATE INDEX calls_by_completion ON calls (completed_at) WHERE completed_at IS NOT NULL;

CREATE TABLE logs (
    call_id TEXT PRIMARY KEY REFERENCES calls (id) ON DELETE CASCADE,
    data    BLOB NOT NULL
);
