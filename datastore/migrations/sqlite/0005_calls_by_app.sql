-- fnq datastore, version 5 (SQLite): the calls of one app, newest first, read in that
-- order from an index of their own. Through calls_by_fn (app, fn, ...) SQLite would sort
-- all of the app's calls for each page.

CREATE INDEX calls_by_app ON calls (app, created_at, id);
