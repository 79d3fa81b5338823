-- fnq datastore, version 5 (PostgreSQL): the calls of one app, newest first, read in that
-- order from an index of their own. Without it a page would sort all of the app's calls
-- (through calls_by_fn), or walk the newest calls of every app past the others'.

CREATE INDEX calls_by_app ON calls (app, created_at, id);
