-- Two writers (several nodes, or `import` beside `serve`) could give two
-- different contents of a study the same version, and so the same metadata
-- ETag: both took the wall clock's microsecond when the content clock was
-- behind it. A version is now the wall clock's microsecond times 1024 plus
-- the low bits of the content clock (a sequence: different for every
-- change), so changes in the same microsecond differ, and versions still
-- never fall behind what a restored or rebuilt index handed out before.
CREATE OR REPLACE FUNCTION study_content_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v BIGINT := (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT * 1024
        + nextval('content_clock') % 1024;
BEGIN
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
