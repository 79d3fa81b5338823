-- fnq datastore, version 1 (PostgreSQL).

CREATE TABLE fns (
    app             text             NOT NULL,
    name            text             NOT NULL,
    image           text             NOT NULL,
    memory_mb       integer          NOT NULL,
    cpus_mcpu       integer          NOT NULL,
    timeout_s       integer          NOT NULL,
    idle_timeout_s  integer          NOT NULL,
    tmpfs_mb        integer          NOT NULL,
    config          text             NOT NULL,
    max_attempts    integer          NOT NULL,
    retry_backoff_s double precision NOT NULL,
    max_age_s       integer          NOT NULL,
    created_at      timestamptz      NOT NULL,
    updated_at      timestamptz      NOT NULL,
    PRIMARY KEY (app, name)
);

CREATE TABLE calls (
    id                 text        PRIMARY KEY,
    app                text        NOT NULL,
    fn                 text        NOT NULL,
    image              text,
    status             text        NOT NULL,
    error              text,
    failure            text,
    attempts           integer     NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL,
    started_at         timestamptz,
    completed_at       timestamptz,
    updated_at         timestamptz NOT NULL,
    next_try_at        timestamptz,
    worker_id          text,
    container_id       text,
    response_status    integer,
    response_headers   text,
    response_body      bytea,
    response_truncated boolean     NOT NULL DEFAULT false,
    log_truncated      boolean     NOT NULL DEFAULT false,
    stats              text,
    cancel_requested   boolean     NOT NULL DEFAULT false
);

CREATE INDEX calls_by_fn ON calls (app, fn, id);
CREATE INDEX calls_by_status ON calls (status, id);
CREATE INDEX calls_by_completion ON calls (completed_at) WHERE completed_at IS NOT NULL;

CREATE TABLE logs (
    call_id text  PRIMARY KEY REFERENCES calls (id) ON DELETE CASCADE,
    data    bytea NOT NULL
);
