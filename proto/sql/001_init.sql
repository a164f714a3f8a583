-- 001_init.sql: radpipe's first schema: the DICOM index (studies, series, instances), jobs
-- with leases and artifacts, the transactional outbox, consumer idempotency, API tokens and
-- the quarantine of inputs that could not be indexed.
-- Applied by lc_db_migrate in one transaction under pg_advisory_lock; never edit a released
-- migration, add a new numbered file instead.

CREATE TABLE studies (
    study_uid           text PRIMARY KEY,
    patient_id          text,
    patient_name        text,          -- DICOM PN form, UTF-8
    patient_birth_date  text,
    patient_sex         text,
    study_date          text,          -- YYYYMMDD as in the files
    study_time          text,
    accession_number    text,
    study_id            text,
    study_description   text,
    referring_physician text,
    modalities          text[] NOT NULL DEFAULT '{}',
    num_series          integer NOT NULL DEFAULT 0,
    num_instances       integer NOT NULL DEFAULT 0,
    -- completion: a study is "dirty" while instances arrive; the indexer completes it once
    -- it has been quiet long enough and bumps completed_version (1, 2, ... amended)
    dirty               boolean NOT NULL DEFAULT true,
    last_instance_at    timestamptz NOT NULL DEFAULT now(),
    completed_version   integer NOT NULL DEFAULT 0,
    completed_at        timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX studies_pending_idx ON studies (last_instance_at) WHERE dirty;
CREATE INDEX studies_patient_id_idx ON studies (patient_id);
CREATE INDEX studies_study_date_idx ON studies (study_date);
CREATE INDEX studies_created_idx ON studies (created_at);

CREATE TABLE series (
    series_uid          text PRIMARY KEY,
    study_uid           text NOT NULL REFERENCES studies (study_uid) ON DELETE CASCADE,
    modality            text,
    series_number       integer,
    series_description  text,
    body_part_examined  text,
    num_instances       integer NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX series_study_idx ON series (study_uid);

CREATE TABLE instances (
    sop_uid             text PRIMARY KEY,
    series_uid          text NOT NULL REFERENCES series (series_uid) ON DELETE CASCADE,
    study_uid           text NOT NULL REFERENCES studies (study_uid) ON DELETE CASCADE,
    sop_class_uid       text NOT NULL,
    transfer_syntax_uid text,
    instance_number     integer,
    rows                integer,
    columns             integer,
    number_of_frames    integer,
    image_position      double precision[],   -- ImagePositionPatient (3)
    image_orientation   double precision[],   -- ImageOrientationPatient (6)
    pixel_spacing       double precision[],   -- PixelSpacing (2)
    slice_thickness     double precision,
    store_key           text NOT NULL,        -- key in RADPIPE_STORE_URL
    size_bytes          bigint NOT NULL,
    sha256              text NOT NULL,
    replaced_count      integer NOT NULL DEFAULT 0,  -- times a different file replaced it
    received_at         timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX instances_series_idx ON instances (series_uid);
CREATE INDEX instances_study_idx ON instances (study_uid);

CREATE TABLE jobs (
    id                  uuid PRIMARY KEY,
    kind                text NOT NULL CHECK (kind IN ('upload', 'segment')),
    study_uid           text NOT NULL,
    state               text NOT NULL DEFAULT 'queued'
                        CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'dead',
                                         'cancelled')),
    params              jsonb NOT NULL DEFAULT '{}',
    progress            jsonb,
    result              jsonb,
    error               text,
    attempts            integer NOT NULL DEFAULT 0,
    max_attempts        integer NOT NULL DEFAULT 5,
    dedupe_key          text UNIQUE,
    lease_owner         text,
    lease_expires_at    timestamptz,
    retry_at            timestamptz,          -- failed jobs are re-queued after this
    published_at        timestamptz NOT NULL DEFAULT now(),  -- last job event to the outbox
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz
);
CREATE INDEX jobs_study_idx ON jobs (study_uid);
CREATE INDEX jobs_lease_idx ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_retry_idx ON jobs (retry_at) WHERE state = 'failed';
CREATE INDEX jobs_queued_idx ON jobs (published_at) WHERE state = 'queued';
CREATE INDEX jobs_created_idx ON jobs (created_at);

CREATE TABLE job_artifacts (
    job_id              uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name                text NOT NULL,
    store_key           text NOT NULL,
    size_bytes          bigint NOT NULL,
    media_type          text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, name)
);

-- Transactional outbox: rows written in the same transaction as the state they announce;
-- the relay publishes them in id order and deletes them after the broker's ack.
CREATE TABLE outbox (
    id                  bigserial PRIMARY KEY,
    topic               text NOT NULL,
    key                 text,
    payload             text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);

-- Consumer idempotency: an event id recorded here was fully processed by that consumer.
CREATE TABLE processed_events (
    consumer            text NOT NULL,
    event_id            text NOT NULL,
    processed_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX processed_events_at_idx ON processed_events (processed_at);

-- Bearer tokens: only the SHA-256 of the token is stored.
CREATE TABLE api_tokens (
    id                  uuid PRIMARY KEY,
    name                text NOT NULL,
    token_sha256        bytea NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    scopes              text[] NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz,
    revoked_at          timestamptz,
    last_used_at        timestamptz
);

-- Inputs that could not be indexed (not DICOM, missing UIDs, unreadable object).
CREATE TABLE quarantine (
    id                  bigserial PRIMARY KEY,
    source              text NOT NULL,        -- e.g. "kafka:radpipe.instance.stored/0@42"
    store_key           text,                 -- where the bytes were kept, when they were
    reason              text NOT NULL,
    event_id            text,
    created_at          timestamptz NOT NULL DEFAULT now()
);
