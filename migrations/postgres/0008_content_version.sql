-- The validator (ETag) of a study's metadata comes from the study row instead
-- of from every instance's digest: reading 1,000 instances' rows only for it
-- took PostgreSQL more than a third of the answer's time.
--
-- `content_version` changes whenever an instance of the study is added,
-- changed, moved or removed, to a value no study ever had before (one
-- sequence for the whole index), so that a study removed and made again
-- never repeats an earlier validator. Kept by a trigger, so that every
-- writer (the index writer, the start-up check's roll-back, repairs) keeps it.
ALTER TABLE study ADD COLUMN content_version BIGINT NOT NULL DEFAULT 0;
CREATE SEQUENCE content_clock;
CREATE FUNCTION study_content_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        UPDATE study SET content_version = nextval('content_clock')
        WHERE id = (SELECT study_ref FROM series WHERE id = OLD.series_ref);
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.series_ref <> OLD.series_ref) THEN
        UPDATE study SET content_version = nextval('content_clock')
        WHERE id = (SELECT study_ref FROM series WHERE id = NEW.series_ref);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER instance_content AFTER INSERT OR UPDATE OR DELETE ON instance
    FOR EACH ROW EXECUTE FUNCTION study_content_changed();
