-- The search index: patient / study / series / instance, rebuilt by `reindex`
-- from the object store. Dates are YYYYMMDD text, times HHMMSS.frac text.
CREATE TABLE patient (
    id INTEGER PRIMARY KEY,
    institution TEXT NOT NULL,
    issuer TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    name_alphabetic TEXT,
    name_ideographic TEXT,
    name_phonetic TEXT,
    birth_date TEXT,
    sex TEXT,
    other_patient_ids TEXT,
    UNIQUE (institution, issuer, patient_id)
);

CREATE TABLE study (
    id INTEGER PRIMARY KEY,
    patient_ref INTEGER NOT NULL REFERENCES patient (id),
    institution TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    study_date TEXT,
    study_time TEXT,
    accession_number TEXT,
    study_id TEXT,
    description TEXT,
    referring_alphabetic TEXT,
    referring_ideographic TEXT,
    referring_phonetic TEXT,
    UNIQUE (institution, study_uid)
);
CREATE INDEX study_patient ON study (patient_ref);
CREATE INDEX study_uid ON study (study_uid);
CREATE INDEX study_date ON study (study_date);

CREATE TABLE series (
    id INTEGER PRIMARY KEY,
    study_ref INTEGER NOT NULL REFERENCES study (id),
    institution TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    modality TEXT,
    series_number INTEGER,
    description TEXT,
    series_date TEXT,
    series_time TEXT,
    pps_start_date TEXT,
    pps_start_time TEXT,
    body_part TEXT,
    request_attributes TEXT,
    UNIQUE (institution, series_uid)
);
CREATE INDEX series_study ON series (study_ref);
CREATE INDEX series_uid ON series (series_uid);

CREATE TABLE instance (
    id INTEGER PRIMARY KEY,
    series_ref INTEGER NOT NULL REFERENCES series (id),
    institution TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    instance_number INTEGER,
    transfer_syntax TEXT NOT NULL,
    object_key TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    number_of_frames INTEGER,
    rows INTEGER,
    columns INTEGER,
    bits_allocated INTEGER,
    sender_ae TEXT,
    received_at TEXT NOT NULL,
    -- What WADO needs without reopening the object: the DICOM JSON (bulk
    -- data as references) and the byte ranges of every frame.
    dataset_json TEXT NOT NULL,
    pixel_layout TEXT,
    UNIQUE (institution, sop_uid)
);
CREATE INDEX instance_series ON instance (series_ref);
CREATE INDEX instance_uid ON instance (sop_uid);
