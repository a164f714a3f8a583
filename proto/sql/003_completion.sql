-- 003_completion.sql: study completion and routing rules (the dicom-indexer, idx_complete.c,
-- idx_close.c): where each study came from and its pending explicit close, which version
-- each series was completed in (so an amended version knows its new series), and the
-- priority and rule of the jobs routing rules create.
-- Owned by the indexer's completion code; the gateway only reads.

-- One row per study that has a source, a pending close or completion state. No foreign key:
-- a study.close may arrive before the study's first instance is indexed.
CREATE TABLE study_completion (
    study_uid           text PRIMARY KEY,
    source_kind         text,          -- instance.stored data.source.kind of the first instance
    source_name         text,          -- ... its name (calling AE title, client id, ...)
    close_requested_at  timestamptz,   -- a study.close not yet applied by a completion
    close_reason        text,
    -- the rules' "series_received" condition held at a completed version: it no longer
    -- completes later versions early
    series_listed_done  boolean NOT NULL DEFAULT false,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- Per-series bookkeeping: a row for every study version in which the series was new or had
-- changed (more instances, or a replaced file). The fingerprint (num_instances, replaced_sum)
-- of the latest row is compared with the instances at the next completion.
CREATE TABLE series_versions (
    series_uid          text NOT NULL REFERENCES series (series_uid) ON DELETE CASCADE,
    study_uid           text NOT NULL,
    version             integer NOT NULL,     -- studies.completed_version it was completed in
    num_instances       integer NOT NULL,
    replaced_sum        bigint NOT NULL,      -- sum of instances.replaced_count at completion
    completed_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (series_uid, version)
);
-- "which series did version N bring" (for the gateway and operators)
CREATE INDEX series_versions_study_idx ON series_versions (study_uid, version);

-- Routing rules: a job's priority (-100..100, higher first; workers take jobs in event
-- order for now and ignore it, so there is no index for it yet) and the rule that created it
-- (NULL for the built-in default and for jobs created over the API).
ALTER TABLE jobs
    ADD COLUMN priority integer NOT NULL DEFAULT 0,
    ADD COLUMN rule text;
