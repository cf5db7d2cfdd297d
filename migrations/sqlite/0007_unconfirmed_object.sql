-- Objects of the local store whose index rows were committed while the
-- object's own flush (file and directory fsync) was still running: the two
-- run at once, and a store is acknowledged only when both are done. A row
-- here outlives its acknowledgement by at most a second (it is cleared with
-- the writer's next batch); after a crash, start-up checks each object
-- listed here against its digest and removes the index rows of any that did
-- not reach the disk whole (they were never acknowledged).
CREATE TABLE unconfirmed_object (
    object_key TEXT PRIMARY KEY,
    institution TEXT NOT NULL,
    sop_uid TEXT NOT NULL
);
