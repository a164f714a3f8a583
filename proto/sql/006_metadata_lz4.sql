-- 006_metadata_lz4.sql: the DICOM JSON of instance_metadata (about 10 KB per CT instance, most
-- of the bytes an index batch writes) is TOAST-compressed with LZ4 where the server has it
-- (PostgreSQL 14+ built with lz4), several times cheaper than the default pglz. A column
-- setting, so writers no longer set default_toast_compression in every transaction (the
-- dicom-indexer did, through the pg_settings view: about 1 ms per batch). Applies to values
-- written from now on; readers decompress either kind transparently.

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE instance_metadata ALTER COLUMN json SET COMPRESSION lz4;
    END IF;
END
$$;
