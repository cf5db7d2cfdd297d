-- Copies a replacement superseded, listed in the transaction that replaced
-- their instance row and removed once deleted from the store: a copy whose
-- deletion a stop or a crash cut off is deleted later by a sweep (unless a
-- row names it again: the same bytes stored anew). The sweep leaves rows
-- younger than some minutes alone: another node may be storing those very
-- bytes (it holds no lock this one can see).
CREATE TABLE superseded_object (
    object_key TEXT PRIMARY KEY,
    institution TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    -- RFC 3339, UTC, milliseconds (the replacing store's receive time).
    listed_at TEXT NOT NULL
);
CREATE INDEX superseded_object_listed ON superseded_object (listed_at);
