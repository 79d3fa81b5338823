-- fnq datastore, version 5 (PostgreSQL): the calls of one app, newest first, read in that
-- order from an index of their own. Through calls_by_fn (app, fn, ...) a page of one
-- app's calls sorted all of that app's calls first.

CREATE INDEX calls_by_app ON calls (app, created_at, id);
