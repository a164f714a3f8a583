-- 005_models.sql: the segmentation models the gpu-segmenters hold resident, for the gateway's
-- GET /api/v1/models. Each gpu-segmenter loads every valid model of its RADPIPE_MODELS_DIR at
-- start (services/gpu-segmenter/seg_model.c) and upserts one row per model here in one
-- transaction; loaded_at and loaded_by tell which segmenter loaded it last and when. Rows are
-- never deleted by the segmenters (a model removed from every RADPIPE_MODELS_DIR keeps its
-- row with an old loaded_at). Column meanings follow model.json
-- (proto/models/model.schema.json): axes slowest first, [z, y, x] or [y, x].

CREATE TABLE models (
    name          text PRIMARY KEY,         -- the folder and model.json name; params.model
    version       text NOT NULL,
    modality      text NOT NULL CHECK (modality IN ('CT', 'MR')),
    description   text NOT NULL DEFAULT '',
    -- [{"value": 1, "name": "Liver", "category": {"code", "scheme", "meaning"},
    --   "type": {"code", "scheme", "meaning"}, "color": [r, g, b]}, ...] in value order;
    -- each label is one DICOM SEG segment (SNOMED CT codes)
    labels        jsonb NOT NULL,
    spatial_dims  smallint NOT NULL CHECK (spatial_dims IN (2, 3)),
    spacing_mm    double precision[] NOT NULL,  -- target spacing
    patch_size    integer[] NOT NULL,           -- sliding-window patch
    normalization jsonb NOT NULL,               -- {"scheme": "ct", percentiles, mean, std} | {"scheme": "zscore"}
    mirroring     boolean NOT NULL,
    sha256        text NOT NULL,                -- of model.onnx
    size_bytes    bigint NOT NULL CHECK (size_bytes >= 0),  -- of model.onnx
    parameters    bigint NOT NULL CHECK (parameters >= 0),  -- weights after folding
    loaded_by     text NOT NULL,                -- the segmenter: host:pid
    loaded_at     timestamptz NOT NULL DEFAULT now()
);
