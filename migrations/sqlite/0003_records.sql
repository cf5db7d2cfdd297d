-- Records, not index: identity records and their links (名寄せ), disclosures
-- (公開設定), break-glass grants and the audit trail. `reindex` never touches
-- these tables; they must be backed up with the database (README).
-- Times are UTC RFC 3339 with microseconds, fixed width
-- (2026-11-25T10:00:00.000000Z), so text order is time order.
CREATE TABLE identity_record (
    id INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL
);

-- An institution's own patient ID linked to a record. The issuer is the
-- institution's namespace, so a link covers exactly the index's patient rows
-- (institution, issuer, patient_id).
CREATE TABLE patient_link (
    institution TEXT NOT NULL,
    issuer TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    record INTEGER NOT NULL REFERENCES identity_record (id),
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (institution, issuer, patient_id)
);
CREATE INDEX patient_link_record ON patient_link (record, institution, patient_id);
CREATE INDEX patient_link_local ON patient_link (institution, patient_id);

CREATE TABLE disclosure (
    id TEXT PRIMARY KEY,
    record INTEGER NOT NULL REFERENCES identity_record (id),
    from_institution TEXT NOT NULL,
    to_institution TEXT NOT NULL,
    -- The discloser's patient ID the disclosure was made for.
    patient_id TEXT NOT NULL,
    consent_reference TEXT NOT NULL,
    consented_at TEXT NOT NULL,
    expires_at TEXT,
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT,
    revoked_by TEXT
);
CREATE INDEX disclosure_grant ON disclosure (record, from_institution, to_institution);
CREATE INDEX disclosure_to ON disclosure (to_institution, created_at);
CREATE INDEX disclosure_from ON disclosure (from_institution, created_at);

CREATE TABLE break_glass (
    id TEXT PRIMARY KEY,
    user_name TEXT NOT NULL,
    institution TEXT NOT NULL,
    patient_institution TEXT NOT NULL,
    patient_issuer TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    granted_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE INDEX break_glass_user ON break_glass (institution, user_name, expires_at);

-- The audit trail: one row per event, one row per patient/study it touched,
-- chained by SHA-256 (hash = H(prev_hash || canonical event)); audit_head
-- holds the chain's end and serializes appenders.
CREATE TABLE audit_event (
    seq INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    action TEXT NOT NULL,
    outcome TEXT NOT NULL,
    user_name TEXT NOT NULL,
    institution TEXT NOT NULL,
    role TEXT NOT NULL,
    client TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_event_user ON audit_event (user_name, seq);
CREATE INDEX audit_event_at ON audit_event (at);

CREATE TABLE audit_object (
    seq INTEGER NOT NULL REFERENCES audit_event (seq),
    patient_institution TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    study_uid TEXT NOT NULL
);
CREATE INDEX audit_object_patient ON audit_object (patient_institution, patient_id, seq);
CREATE INDEX audit_object_seq ON audit_object (seq);

CREATE TABLE audit_head (
    id INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
    VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Append-only, in the database itself.
CREATE TRIGGER audit_event_no_update BEFORE UPDATE ON audit_event
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER audit_event_no_delete BEFORE DELETE ON audit_event
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER audit_object_no_update BEFORE UPDATE ON audit_object
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER audit_object_no_delete BEFORE DELETE ON audit_object
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
