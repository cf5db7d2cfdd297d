-- Who may see each study: one row for its own institution, one per
-- institution that the consent rules open it to (an active disclosure of
-- the patient's identity record by the owner to an institution that links
-- the record too), with the latest expiry among those disclosures (NULL:
-- none). Derived: the index writer adds a study's rows when it writes the
-- study, every change of links and disclosures rewrites the rows of the
-- studies of the identity record it touches, `reindex` rebuilds it all.
-- Searches walk it (institution, study) instead of testing the rule per row.
CREATE TABLE study_access (
    study_ref BIGINT NOT NULL REFERENCES study (id),
    institution TEXT NOT NULL,
    expires_at TEXT,
    -- 'own' or 'disclosed'.
    kind TEXT NOT NULL,
    PRIMARY KEY (study_ref, institution)
);
CREATE INDEX study_access_institution ON study_access (institution, study_ref, expires_at);

INSERT INTO study_access (study_ref, institution, expires_at, kind)
    SELECT id, institution, NULL, 'own' FROM study;
INSERT INTO study_access (study_ref, institution, expires_at, kind)
    SELECT st.id, d.to_institution,
        CASE WHEN COUNT(*) > COUNT(d.expires_at) THEN NULL ELSE MAX(d.expires_at) END, 'disclosed'
    FROM patient p JOIN study st ON st.patient_ref = p.id
    JOIN patient_link sl ON sl.institution = p.institution AND sl.issuer = p.issuer
        AND sl.patient_id = p.patient_id
    JOIN disclosure d ON d.record = sl.record AND d.from_institution = sl.institution
        AND d.revoked_at IS NULL
    WHERE EXISTS (SELECT 1 FROM patient_link tl WHERE tl.record = sl.record
        AND tl.institution = d.to_institution)
    GROUP BY st.id, d.to_institution;
