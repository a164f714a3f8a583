-- 002_qido.sql: what QIDO-RS matching and WADO-RS metadata need (PS3.18 10.6): patients,
-- normalised columns for case-insensitive and wildcard matching, the series and instance
-- attributes QIDO returns, and the full header of every instance as DICOM JSON (Annex F,
-- bulk data left out). The indexer writes these columns; the gateway only reads them.
--
-- Conventions:
--  *_norm   upper-cased (Unicode-aware) copy of a PN/LO value used for matching; the value
--           itself is kept as received (UTF-8). Wildcards * and ? map to LIKE % and _.
--  dates    DICOM DA as text YYYYMMDD (8 digits: ranges compare as text); times TM as text
--           HHMMSS[.ffffff]; NULL when absent or malformed.

CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE patients (
    patient_key          text PRIMARY KEY,       -- issuer || '|' || patient_id
    patient_id           text NOT NULL,
    issuer_of_patient_id text,
    patient_name         text,
    patient_name_norm    text,
    patient_birth_date   text,
    patient_sex          text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX patients_id_idx ON patients (patient_id);

ALTER TABLE studies
    ADD COLUMN patient_key text REFERENCES patients (patient_key) ON DELETE SET NULL,
    ADD COLUMN issuer_of_patient_id text,
    ADD COLUMN patient_name_norm text,
    ADD COLUMN referring_physician_norm text,
    ADD COLUMN study_description_norm text,
    ADD COLUMN institution_name text,
    ADD COLUMN timezone_offset text;          -- TimezoneOffsetFromUTC, when given
CREATE INDEX studies_patient_key_idx ON studies (patient_key);
CREATE INDEX studies_patient_name_prefix_idx ON studies (patient_name_norm text_pattern_ops);
CREATE INDEX studies_patient_name_trgm_idx ON studies USING gin (patient_name_norm gin_trgm_ops);
CREATE INDEX studies_referring_prefix_idx ON studies (referring_physician_norm text_pattern_ops);
CREATE INDEX studies_description_trgm_idx ON studies
    USING gin (study_description_norm gin_trgm_ops);
CREATE INDEX studies_accession_idx ON studies (accession_number);
CREATE INDEX studies_study_id_idx ON studies (study_id);
CREATE INDEX studies_date_time_idx ON studies (study_date, study_time);
CREATE INDEX studies_modalities_idx ON studies USING gin (modalities);

ALTER TABLE series
    ADD COLUMN series_date text,
    ADD COLUMN series_time text,
    ADD COLUMN performed_procedure_step_start_date text,
    ADD COLUMN performed_procedure_step_start_time text,
    ADD COLUMN request_attributes jsonb;      -- RequestAttributesSequence as DICOM JSON items
CREATE INDEX series_modality_idx ON series (modality);
CREATE INDEX series_number_idx ON series (study_uid, series_number);
CREATE INDEX series_pps_date_idx ON series (performed_procedure_step_start_date);

ALTER TABLE instances
    ADD COLUMN bits_allocated integer,
    ADD COLUMN content_date text,
    ADD COLUMN content_time text;
CREATE INDEX instances_sop_class_idx ON instances (sop_class_uid);
CREATE INDEX instances_number_idx ON instances (series_uid, instance_number);

-- The whole header of each instance as DICOM JSON (PS3.18 Annex F): an object keyed by the
-- 8 hex digit tag, values {"vr": ..., "Value": [...]} or {"vr": ..., "InlineBinary": ...};
-- Pixel Data and other bulk data are left out (the gateway adds BulkDataURI when serving).
CREATE TABLE instance_metadata (
    sop_uid   text PRIMARY KEY REFERENCES instances (sop_uid) ON DELETE CASCADE,
    json      jsonb NOT NULL
);
