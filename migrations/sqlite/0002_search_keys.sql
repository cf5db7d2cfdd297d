-- QIDO-RS matching. Person names are matched case-insensitively on each
-- component group, so each group has an upper-cased search key (written by
-- the index writer; the UPDATE covers rows from before this migration, with
-- the database's own, ASCII-only on SQLite, UPPER — reindex refreshes them).
ALTER TABLE patient ADD COLUMN name_alphabetic_key TEXT;
ALTER TABLE patient ADD COLUMN name_ideographic_key TEXT;
ALTER TABLE patient ADD COLUMN name_phonetic_key TEXT;
ALTER TABLE study ADD COLUMN referring_alphabetic_key TEXT;
ALTER TABLE study ADD COLUMN referring_ideographic_key TEXT;
ALTER TABLE study ADD COLUMN referring_phonetic_key TEXT;
UPDATE patient SET name_alphabetic_key = UPPER(name_alphabetic),
    name_ideographic_key = UPPER(name_ideographic), name_phonetic_key = UPPER(name_phonetic);
UPDATE study SET referring_alphabetic_key = UPPER(referring_alphabetic),
    referring_ideographic_key = UPPER(referring_ideographic),
    referring_phonetic_key = UPPER(referring_phonetic);

CREATE INDEX patient_patient_id ON patient (patient_id);
CREATE INDEX patient_name_alphabetic ON patient (name_alphabetic_key);
CREATE INDEX patient_name_ideographic ON patient (name_ideographic_key);
CREATE INDEX patient_name_phonetic ON patient (name_phonetic_key);
CREATE INDEX study_accession ON study (accession_number);
CREATE INDEX study_institution ON study (institution, id);
CREATE INDEX series_modality ON series (modality, study_ref);
CREATE INDEX series_institution ON series (institution, id);
CREATE INDEX instance_institution ON instance (institution, id);
CREATE INDEX instance_sop_class ON instance (sop_class_uid);
