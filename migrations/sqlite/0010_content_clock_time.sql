-- The content clock never runs behind the wall clock (µs since the epoch):
-- after a backup is restored or the index is rebuilt into a new database, a
-- study must not get a version (and so a metadata ETag) that a client may
-- still hold for other contents.
DROP TRIGGER instance_added;
DROP TRIGGER instance_changed;
DROP TRIGGER instance_removed;
CREATE TRIGGER instance_added AFTER INSERT ON instance BEGIN
    UPDATE content_clock
    SET tick = MAX(tick + 1, CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER));
    UPDATE study SET content_version = (SELECT tick FROM content_clock)
    WHERE id = (SELECT study_ref FROM series WHERE id = NEW.series_ref);
END;
CREATE TRIGGER instance_changed AFTER UPDATE ON instance BEGIN
    UPDATE content_clock
    SET tick = MAX(tick + 1, CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER));
    UPDATE study SET content_version = (SELECT tick FROM content_clock)
    WHERE id IN (SELECT study_ref FROM series WHERE id IN (OLD.series_ref, NEW.series_ref));
END;
CREATE TRIGGER instance_removed AFTER DELETE ON instance BEGIN
    UPDATE content_clock
    SET tick = MAX(tick + 1, CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER));
    UPDATE study SET content_version = (SELECT tick FROM content_clock)
    WHERE id = (SELECT study_ref FROM series WHERE id = OLD.series_ref);
END;
