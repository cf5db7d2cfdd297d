-- Copies a replacement superseded, listed in the transaction that replaced
-- their instance row and removed once deleted from the store: a copy whose
-- deletion a stop or a crash cut off is deleted at the next start (unless a
-- row names it again: the same bytes stored anew).
CREATE TABLE superseded_object (
    object_key TEXT PRIMARY KEY,
    institution TEXT NOT NULL,
    sop_uid TEXT NOT NULL
);
