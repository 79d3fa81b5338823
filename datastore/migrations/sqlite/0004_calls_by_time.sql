-- fnq datastore, version 4 (SQLite): calls are listed newest first by their creation
-- time, then id, whatever their ids look like (a producer's own, RQ's UUIDs). The
-- indexes that listing uses follow that order.

DROP INDEX calls_by_fn;
DROP INDEX calls_by_status;
CREATE INDEX calls_by_time ON calls (created_at, id);
CREATE INDEX calls_by_fn ON calls (app, fn, created_at, id);
CREATE INDEX calls_by_status ON calls (status, created_at, id);
