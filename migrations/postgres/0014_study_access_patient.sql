-- The access rows carry their study's patient row too (a study never moves
-- to another patient), in the walk's index: a search by patient attributes
-- under the consent rule (a name with a wildcard, a birth date) then walks
-- the caller's rows and tests each one's patient, without reading the study
-- row first. PostgreSQL read every study row up to the page's last one
-- (a merge join in study order, four in five not the caller's): PatientName=
-- YAMA* cost 1.36x the search without the rule at 1,000,000 instances.
ALTER TABLE study_access ADD COLUMN patient_ref BIGINT;
UPDATE study_access SET patient_ref = (SELECT st.patient_ref FROM study st WHERE st.id = study_access.study_ref);
ALTER TABLE study_access ALTER COLUMN patient_ref SET NOT NULL;
DROP INDEX study_access_walk;
CREATE INDEX study_access_walk ON study_access (institution, study_ref, expires_at, study_date, patient_ref);
