-- A 'disclosed' access row carries the patient ID its institution is shown
-- for the study's patient (the least of that institution's own IDs linked
-- to the same identity record), kept with the row by every change of links
-- and disclosures. A study list under the consent rule reads it with the
-- access row instead of looking up two links per row of another
-- institution: on SQLite at 1,000,000 instances that lookup was ~60 of the
-- OHIF list's ~430 us.
ALTER TABLE study_access ADD COLUMN presented_patient_id TEXT;
DELETE FROM study_access WHERE kind = 'disclosed';
INSERT INTO study_access (study_ref, institution, expires_at, kind, study_date, patient_ref, presented_patient_id)
    SELECT st.id, d.to_institution,
        CASE WHEN COUNT(*) > COUNT(d.expires_at) THEN NULL ELSE MAX(d.expires_at) END, 'disclosed',
        st.study_date, st.patient_ref,
        (SELECT MIN(ml.patient_id) FROM patient_link ml
            WHERE ml.record = sl.record AND ml.institution = d.to_institution)
    FROM patient p JOIN study st ON st.patient_ref = p.id
    JOIN patient_link sl ON sl.institution = p.institution AND sl.issuer = p.issuer
        AND sl.patient_id = p.patient_id
    JOIN disclosure d ON d.record = sl.record AND d.from_institution = sl.institution
        AND d.revoked_at IS NULL
    WHERE EXISTS (SELECT 1 FROM patient_link tl WHERE tl.record = sl.record
        AND tl.institution = d.to_institution)
    GROUP BY st.id, st.study_date, st.patient_ref, sl.record, d.to_institution;
