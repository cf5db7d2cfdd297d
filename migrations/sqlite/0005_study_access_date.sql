-- The study's date beside each access row: a date range under the consent
-- rule is then one range of (institution, study_date) instead of a probe of
-- the access rows per study of the range. Kept with the row by the index
-- writer and by every consent change.
ALTER TABLE study_access ADD COLUMN study_date TEXT;
UPDATE study_access SET study_date = (SELECT st.study_date FROM study st WHERE st.id = study_access.study_ref);
CREATE INDEX study_access_date ON study_access (institution, study_date, study_ref, expires_at);
