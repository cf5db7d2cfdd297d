-- The validator (ETag) of a study's metadata comes from the study row instead
-- of from every instance's digest: reading 1,000 instances' rows only for it
-- took PostgreSQL more than a third of the answer's time.
--
-- `content_version` changes whenever an instance of the study is added,
-- changed, moved or removed, to a value no study ever had before (a clock
-- over the whole index), so that a study removed and made again under the
-- same row id never repeats an earlier validator. Kept by triggers, so that
-- every writer (the index writer, the start-up check's roll-back, repairs)
-- keeps it.
ALTER TABLE study ADD COLUMN content_version INTEGER NOT NULL DEFAULT 0;
CREATE TABLE content_clock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    tick INTEGER NOT NULL
);
INSERT INTO content_clock (id, tick) VALUES (1, 0);
CREATE TRIGGER instance_added AFTER INSERT ON instance BEGIN
    UPDATE content_clock SET tick = tick + 1;
    UPDATE study SET content_version = (SELECT tick FROM content_clock)
    WHERE id = (SELECT study_ref FROM series WHERE id = NEW.series_ref);
END;
CREATE TRIGGER instance_changed AFTER UPDATE ON instance BEGIN
    UPDATE content_clock SET tick = tick + 1;
    UPDATE study SET content_version = (SELECT tick FROM content_clock)
    WHERE id IN (SELECT study_ref FROM series WHERE id IN (OLD.series_ref, NEW.series_ref));
END;
CREATE TRIGGER instance_removed AFTER DELETE ON instance BEGIN
    UPDATE content_clock SET tick = tick + 1;
    UPDATE study SET content_version = (SELECT tick FROM content_clock)
    WHERE id = (SELECT study_ref FROM series WHERE id = OLD.series_ref);
END;
