-- 004_upload_resume.sql: the storage-uploader's resume state. While a multipart upload is in
-- progress its upload id and every part the object store acknowledged are recorded here, so
-- an uploader that crashed or was stopped resumes the upload instead of starting over (the
-- parts listed here are not sent again). A row lives from CreateMultipartUpload until the
-- object is complete or the upload is aborted. Keyed by destination (the archive store's
-- URL, never with credentials) and object key: one upload per object at a time.

CREATE TABLE upload_multipart (
    destination text NOT NULL,             -- "s3://bucket" (lc_store_url of the archive)
    object_key  text NOT NULL,             -- key within the destination
    upload_id   text NOT NULL,
    digest      text NOT NULL,             -- what the object will hold (lc_store digest)
    part_size   bigint NOT NULL CHECK (part_size > 0),
    job_id      uuid,                      -- the job that started it (information only)
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (destination, object_key)
);

CREATE TABLE upload_parts (
    destination text NOT NULL,
    object_key  text NOT NULL,
    part_number integer NOT NULL CHECK (part_number BETWEEN 1 AND 10000),
    size_bytes  bigint NOT NULL CHECK (size_bytes >= 0),
    etag        text NOT NULL,
    sha256      text NOT NULL,             -- of the part's bytes, checked again on resume
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (destination, object_key, part_number),
    FOREIGN KEY (destination, object_key) REFERENCES upload_multipart ON DELETE CASCADE
);
