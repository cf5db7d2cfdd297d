-- The object key an instance row named before its last write: the write
-- returns it (`RETURNING`), so ingest deletes the copy the row really
-- superseded, even when another store of the same instance committed
-- between ingest's lookup and this write (two versions at once, or two
-- first copies). Kept on the row as history; the object itself is deleted.
ALTER TABLE instance ADD COLUMN superseded_key TEXT;
