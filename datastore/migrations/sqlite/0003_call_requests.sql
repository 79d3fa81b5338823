-- fnq datastore, version 3 (SQLite): the request each call was made with, kept so that
-- `fnq calls show` can display it and `fnq calls retry` can run a finished call again.
-- Columns on `calls` rather than a table of their own: the queued and running upserts
-- already write the call's row, so the request rides in the same statement. All three
-- are NULL when no request was stored (calls recorded before this version).

ALTER TABLE calls ADD COLUMN request_body BLOB;
ALTER TABLE calls ADD COLUMN request_headers TEXT;
ALTER TABLE calls ADD COLUMN request_priority INTEGER;
