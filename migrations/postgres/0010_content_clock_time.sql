-- The content clock never runs behind the wall clock (µs since the epoch):
-- after a backup is restored or the index is rebuilt into a new database, a
-- study must not get a version (and so a metadata ETag) that a client may
-- still hold for other contents.
CREATE OR REPLACE FUNCTION study_content_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v BIGINT := nextval('content_clock');
    now_us BIGINT := (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT;
BEGIN
    IF v < now_us THEN
        v := now_us;
        PERFORM setval('content_clock', v);
    END IF;
    IF TG_OP <> 'INSERT' THEN
        UPDATE study SET content_version = v
        WHERE id = (SELECT study_ref FROM series WHERE id = OLD.series_ref);
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.series_ref <> OLD.series_ref) THEN
        UPDATE study SET content_version = v
        WHERE id = (SELECT study_ref FROM series WHERE id = NEW.series_ref);
    END IF;
    RETURN NULL;
END
$$;
