/*
 * idx_db.c: the indexer's writes. A batch goes to PostgreSQL in chunks, each as it is loaded
 * by the parse pool (so PostgreSQL works while the pool parses the next chunk): one COPY into
 * a session-local staging table (idx_stage), a handful of multi-row statements that upsert
 * patients, studies, series and instances from it, and one COPY of the new instances' DICOM
 * JSON straight into instance_metadata (LZ4-compressed where the server can: migration 006); then
 * one statement recounts the studies that changed and one records their sources. All inside
 * the caller's transaction (the batch's only commit), so the batch is indexed entirely or not
 * at all. Functions take the consuming thread's connection; nothing here keeps state.
 *
 * Name normalisation (the *_norm columns, proto/sql/002_qido.sql): PostgreSQL's upper() of the
 * value as stored (the whole PN value, every component group), computed in the upsert itself,
 * so it is by construction the same function the gateway applies to QIDO-RS query values
 * (upper($n), services/api-gateway/gw_qido.c): Unicode-aware under the database's UTF-8
 * LC_CTYPE (C.UTF-8 in the embedded stack). Dates and times are stored only when well-formed
 * (idx_norm_date, idx_norm_time).
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "idx.h"
#include "lc/outbox.h"
#include "lc/util.h"

/* Items per chunk of a batch's writes: small enough that PostgreSQL starts early and works
 * while the pool parses the next chunk, large enough for multi-row statements to pay. */
#define IDX_WRITE_CHUNK 100

/* The staging table: one row per instance to write, in COPY's column order (see stage_row). */
static const char stage_sql[] =
    "CREATE TEMP TABLE IF NOT EXISTS idx_stage (ord int, study_uid text, patient_key text,"
    " patient_id text, issuer text, patient_name text, patient_birth_date text,"
    " patient_sex text, study_date text, study_time text, accession_number text,"
    " study_id text, study_description text, referring_physician text,"
    " institution_name text, timezone_offset text, series_uid text, modality text,"
    " series_number int, series_description text, body_part_examined text,"
    " series_date text, series_time text, pps_start_date text, pps_start_time text,"
    " request_attributes text, sop_uid text, sop_class_uid text, transfer_syntax_uid text,"
    " instance_number int, rows int, columns int, number_of_frames int, bits_allocated int,"
    " content_date text, content_time text, image_position float8[],"
    " image_orientation float8[], pixel_spacing float8[], slice_thickness float8,"
    " store_key text, size_bytes bigint, sha256 text) ON COMMIT DELETE ROWS";

static const char copy_sql[] = "COPY idx_stage FROM STDIN";
/* Between the chunks of one transaction (the commit empties it anyway). */
static const char unstage_sql[] = "DELETE FROM idx_stage";

/* The DICOM JSON goes straight into instance_metadata, parsed and compressed once: staging
 * it would compress, decompress and parse the ~10 KB documents a second time. */
static const char copy_md_sql[] = "COPY instance_metadata (sop_uid, json) FROM STDIN";

/* Descriptive values: the latest instance that has one wins (a NULL never overwrites); a row
 * is only rewritten when a value really changes, so re-sent instances leave it untouched. */
static const char upsert_patients_sql[] =
    "INSERT INTO patients AS p (patient_key, patient_id, issuer_of_patient_id, patient_name,"
    " patient_name_norm, patient_birth_date, patient_sex)"
    " SELECT DISTINCT ON (r.patient_key) r.patient_key, r.patient_id, r.issuer, r.patient_name,"
    " upper(r.patient_name), r.patient_birth_date, r.patient_sex FROM idx_stage r"
    " WHERE r.patient_key IS NOT NULL ORDER BY r.patient_key, r.ord DESC"
    " ON CONFLICT (patient_key) DO UPDATE SET"
    " patient_name = COALESCE(EXCLUDED.patient_name, p.patient_name),"
    " patient_name_norm = COALESCE(EXCLUDED.patient_name_norm, p.patient_name_norm),"
    " patient_birth_date = COALESCE(EXCLUDED.patient_birth_date, p.patient_birth_date),"
    " patient_sex = COALESCE(EXCLUDED.patient_sex, p.patient_sex), updated_at = now()"
    " WHERE (p.patient_name, p.patient_birth_date, p.patient_sex) IS DISTINCT FROM"
    " (COALESCE(EXCLUDED.patient_name, p.patient_name),"
    " COALESCE(EXCLUDED.patient_birth_date, p.patient_birth_date),"
    " COALESCE(EXCLUDED.patient_sex, p.patient_sex))";

/* One column per line: clang-format would fold these into unreadable runs. */
/* clang-format off */
#define KEEP(c) " " c " = COALESCE(EXCLUDED." c ", s." c "),"
#define NEWV(c) " COALESCE(EXCLUDED." c ", s." c ")"
static const char upsert_studies_sql[] =
    "INSERT INTO studies AS s (study_uid, patient_key, patient_id, issuer_of_patient_id,"
    " patient_name, patient_name_norm, patient_birth_date, patient_sex, study_date, study_time,"
    " accession_number, study_id, study_description, study_description_norm,"
    " referring_physician, referring_physician_norm, institution_name, timezone_offset)"
    " SELECT DISTINCT ON (r.study_uid) r.study_uid, r.patient_key, r.patient_id, r.issuer,"
    " r.patient_name, upper(r.patient_name), r.patient_birth_date, r.patient_sex, r.study_date,"
    " r.study_time, r.accession_number, r.study_id, r.study_description,"
    " upper(r.study_description), r.referring_physician, upper(r.referring_physician),"
    " r.institution_name, r.timezone_offset FROM idx_stage r ORDER BY r.study_uid, r.ord DESC"
    " ON CONFLICT (study_uid) DO UPDATE SET"
    KEEP("patient_key")
    KEEP("patient_id")
    KEEP("issuer_of_patient_id")
    KEEP("patient_name")
    KEEP("patient_name_norm")
    KEEP("patient_birth_date")
    KEEP("patient_sex")
    KEEP("study_date")
    KEEP("study_time")
    KEEP("accession_number")
    KEEP("study_id")
    KEEP("study_description")
    KEEP("study_description_norm")
    KEEP("referring_physician")
    KEEP("referring_physician_norm")
    KEEP("institution_name")
    KEEP("timezone_offset")
    " updated_at = now()"
    " WHERE (s.patient_key, s.patient_id, s.issuer_of_patient_id, s.patient_name,"
    " s.patient_birth_date, s.patient_sex, s.study_date, s.study_time, s.accession_number,"
    " s.study_id, s.study_description, s.referring_physician, s.institution_name,"
    " s.timezone_offset) IS DISTINCT FROM ("
    NEWV("patient_key") ","
    NEWV("patient_id") ","
    NEWV("issuer_of_patient_id") ","
    NEWV("patient_name") ","
    NEWV("patient_birth_date") ","
    NEWV("patient_sex") ","
    NEWV("study_date") ","
    NEWV("study_time") ","
    NEWV("accession_number") ","
    NEWV("study_id") ","
    NEWV("study_description") ","
    NEWV("referring_physician") ","
    NEWV("institution_name") ","
    NEWV("timezone_offset") ")";

static const char upsert_series_sql[] =
    "INSERT INTO series AS s (series_uid, study_uid, modality, series_number,"
    " series_description, body_part_examined, series_date, series_time,"
    " performed_procedure_step_start_date, performed_procedure_step_start_time,"
    " request_attributes)"
    " SELECT DISTINCT ON (r.series_uid) r.series_uid, r.study_uid, r.modality,"
    " r.series_number, r.series_description, r.body_part_examined, r.series_date,"
    " r.series_time, r.pps_start_date, r.pps_start_time, r.request_attributes::jsonb"
    " FROM idx_stage r ORDER BY r.series_uid, r.ord DESC"
    " ON CONFLICT (series_uid) DO UPDATE SET study_uid = EXCLUDED.study_uid,"
    KEEP("modality")
    KEEP("series_number")
    KEEP("series_description")
    KEEP("body_part_examined")
    KEEP("series_date")
    KEEP("series_time")
    KEEP("performed_procedure_step_start_date")
    KEEP("performed_procedure_step_start_time")
    KEEP("request_attributes")
    " updated_at = now()"
    " WHERE (s.study_uid, s.modality, s.series_number, s.series_description,"
    " s.body_part_examined, s.series_date, s.series_time, s.performed_procedure_step_start_date,"
    " s.performed_procedure_step_start_time, s.request_attributes) IS DISTINCT FROM"
    " (EXCLUDED.study_uid,"
    NEWV("modality") ","
    NEWV("series_number") ","
    NEWV("series_description") ","
    NEWV("body_part_examined") ","
    NEWV("series_date") ","
    NEWV("series_time") ","
    NEWV("performed_procedure_step_start_date") ","
    NEWV("performed_procedure_step_start_time") ","
    NEWV("request_attributes") ")";
#undef KEEP
#undef NEWV
/* clang-format on */

/* A known SOPInstanceUID with other bytes is replaced (latest wins); the same bytes again
 * change nothing. (xmax = 0) tells a fresh insert ('i') from an update ('r'); known instances
 * that lack their DICOM JSON come back as 'm'. The DICOM JSON of all three is then copied
 * into instance_metadata (copy_md_sql). */
static const char upsert_instances_sql[] =
    "WITH up AS (INSERT INTO instances AS i (sop_uid, series_uid, study_uid, sop_class_uid,"
    " transfer_syntax_uid, instance_number, rows, columns, number_of_frames, bits_allocated,"
    " content_date, content_time, image_position, image_orientation, pixel_spacing,"
    " slice_thickness, store_key, size_bytes, sha256)"
    " SELECT r.sop_uid, r.series_uid, r.study_uid, r.sop_class_uid, r.transfer_syntax_uid,"
    " r.instance_number, r.rows, r.columns, r.number_of_frames, r.bits_allocated,"
    " r.content_date, r.content_time, r.image_position, r.image_orientation, r.pixel_spacing,"
    " r.slice_thickness, r.store_key, r.size_bytes, r.sha256 FROM idx_stage r ORDER BY r.sop_uid"
    " ON CONFLICT (sop_uid) DO UPDATE SET series_uid = EXCLUDED.series_uid,"
    " study_uid = EXCLUDED.study_uid, sop_class_uid = EXCLUDED.sop_class_uid,"
    " transfer_syntax_uid = EXCLUDED.transfer_syntax_uid,"
    " instance_number = EXCLUDED.instance_number, rows = EXCLUDED.rows,"
    " columns = EXCLUDED.columns, number_of_frames = EXCLUDED.number_of_frames,"
    " bits_allocated = EXCLUDED.bits_allocated, content_date = EXCLUDED.content_date,"
    " content_time = EXCLUDED.content_time,"
    " image_position = EXCLUDED.image_position, image_orientation = EXCLUDED.image_orientation,"
    " pixel_spacing = EXCLUDED.pixel_spacing, slice_thickness = EXCLUDED.slice_thickness,"
    " store_key = EXCLUDED.store_key, size_bytes = EXCLUDED.size_bytes,"
    " sha256 = EXCLUDED.sha256, replaced_count = i.replaced_count + 1, received_at = now(),"
    " updated_at = now()"
    " WHERE i.sha256 IS DISTINCT FROM EXCLUDED.sha256"
    " RETURNING i.sop_uid, CASE WHEN i.xmax = 0 THEN 'i' ELSE 'r' END AS what)"
    " SELECT sop_uid, what FROM up UNION ALL"
    " SELECT r.sop_uid, 'm' FROM idx_stage r"
    " WHERE r.sop_uid NOT IN (SELECT sop_uid FROM up)"
    " AND NOT EXISTS (SELECT 1 FROM instance_metadata e WHERE e.sop_uid = r.sop_uid)";

/* The DICOM JSON of replaced instances is written again (COPY cannot update). */
static const char drop_md_sql[] =
    "DELETE FROM instance_metadata"
    " WHERE sop_uid = ANY (ARRAY(SELECT jsonb_array_elements_text($1::jsonb)))";

/* Counts are recomputed from the instances table (never incremented), so they stay exact
 * whatever was redelivered; the studies are marked dirty for completion.
 * Each batch must cost what its own studies cost, not what the archive holds:
 *  - every table is read through an index on the batch's keys (col = ANY (array)). A join
 *    against jsonb_array_elements_text, which the planner guesses at 100 rows, let it hash
 *    whole tables;
 *  - it is planned on every call (lc_db_exec), like seen_sql. A prepared statement keeps the
 *    generic plan it made while the tables were small (a sequential scan) until autovacuum
 *    next analyzes them: after a bulk load each batch read the whole archive.
 * test_idx's test_batch_cost_is_independent_of_archive_size checks both. */
static const char recount_sql[] =
    "WITH u AS (SELECT ARRAY(SELECT DISTINCT jsonb_array_elements_text($1::jsonb)) AS uids),"
    " sc AS (SELECT i.series_uid, count(*)::int AS n FROM instances i"
    "  WHERE i.study_uid = ANY ((SELECT uids FROM u)::text[]) GROUP BY i.series_uid),"
    " ser AS (UPDATE series se SET num_instances = sc.n, updated_at = now() FROM sc"
    "  WHERE se.series_uid = ANY (ARRAY(SELECT series_uid FROM sc))"
    "  AND se.series_uid = sc.series_uid AND se.num_instances <> sc.n RETURNING 1)"
    " UPDATE studies st SET num_series = c.ns, num_instances = c.ni, modalities = m.mods,"
    " dirty = true, last_instance_at = now(), updated_at = now()"
    " FROM (SELECT i.study_uid, count(DISTINCT i.series_uid)::int AS ns, count(*)::int AS ni,"
    "       array_agg(DISTINCT i.series_uid) AS sers FROM instances i"
    "       WHERE i.study_uid = ANY ((SELECT uids FROM u)::text[]) GROUP BY i.study_uid) c"
    " CROSS JOIN LATERAL (SELECT COALESCE(array_agg(DISTINCT se.modality ORDER BY se.modality)"
    "  FILTER (WHERE se.modality IS NOT NULL), '{}') AS mods"
    "  FROM series se WHERE se.series_uid = ANY (c.sers)) m"
    " WHERE st.study_uid = ANY ((SELECT uids FROM u)::text[]) AND st.study_uid = c.study_uid";

/* Which source (instance.stored data.source) sent each study, for routing rules: the first
 * one recorded stays. jsonb_to_recordset's rows do not change the plan: prepared once. */
static const char sources_sql[] =
    "INSERT INTO study_completion AS c (study_uid, source_kind, source_name)"
    " SELECT DISTINCT ON (r.study_uid) r.study_uid, r.kind, r.name"
    " FROM jsonb_to_recordset($1::jsonb) AS r(ord int, study_uid text, kind text, name text)"
    " ORDER BY r.study_uid, r.ord"
    " ON CONFLICT (study_uid) DO UPDATE SET source_kind = EXCLUDED.source_kind,"
    " source_name = EXCLUDED.source_name, updated_at = now()"
    " WHERE c.source_kind IS NULL AND c.source_name IS NULL";

/* An index scan on (consumer, event_id) whatever the table's size: see recount_sql. */
static const char seen_sql[] =
    "SELECT event_id FROM processed_events WHERE consumer = $1"
    " AND event_id = ANY (ARRAY(SELECT jsonb_array_elements_text($2::jsonb)))";

static const char claim_sql[] = "INSERT INTO processed_events (consumer, event_id)"
                                " SELECT $1, e FROM jsonb_array_elements_text($2::jsonb) AS e"
                                " ON CONFLICT DO NOTHING RETURNING event_id";

static const char quarantine_sql[] =
    "INSERT INTO quarantine (source, store_key, reason, event_id) VALUES ($1, $2, $3, $4)";

/* Items whose event goes to processed_events: every valid event not skipped already. */
static int wants_claim(const idx_item *it)
{
    return it->ev && it->state != IDX_SKIP;
}

static char *print_free(cJSON *j)
{
    char *s = j ? cJSON_PrintUnformatted(j) : NULL;
    cJSON_Delete(j);
    return s;
}

/* JSON array of the event ids of the items pred selects; *count gets their number. */
static char *ids_json(const idx_item *items, size_t n, int (*pred)(const idx_item *), size_t *count)
{
    cJSON *a = cJSON_CreateArray();
    *count = 0;
    for (size_t i = 0; a && i < n; i++) {
        if (!pred(&items[i]))
            continue;
        cJSON *s = cJSON_CreateString(items[i].ev->id);
        if (!s || !cJSON_AddItemToArray(a, s)) {
            cJSON_Delete(s);
            cJSON_Delete(a);
            return NULL;
        }
        (*count)++;
    }
    return print_free(a);
}

static void mark_ids(idx_item *items, size_t n, const char *id, int (*pred)(const idx_item *),
                     int *flags)
{
    for (size_t i = 0; i < n; i++)
        if (pred(&items[i]) && strcmp(items[i].ev->id, id) == 0)
            flags[i] = 1;
}

lc_rc idx_db_mark_processed(lc_db *db, idx_item *items, size_t n, lc_err *err)
{
    size_t count = 0;
    PGresult *res = NULL;
    char *ids = ids_json(items, n, wants_claim, &count);
    if (!ids)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    lc_rc rc = LC_OK;
    if (count == 0)
        goto out;
    const char *p[2] = {IDX_SERVICE, ids};
    if ((rc = lc_db_exec(db, seen_sql, 2, p, &res, err)) != LC_OK)
        goto out;
    for (int r = 0; r < PQntuples(res); r++) {
        for (size_t i = 0; i < n; i++)
            if (wants_claim(&items[i]) && strcmp(items[i].ev->id, PQgetvalue(res, r, 0)) == 0)
                items[i].state = IDX_SKIP;
    }
out:
    PQclear(res);
    free(ids);
    return rc;
}

/* Insert processed_events rows; claimed[i] = 1 for the items this transaction owns (0 when a
 * concurrent consumer committed the same event first). */
static lc_rc claim_events(lc_db *db, idx_item *items, size_t n, int *claimed, lc_err *err)
{
    size_t count = 0;
    PGresult *res = NULL;
    char *ids = ids_json(items, n, wants_claim, &count);
    if (!ids)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    lc_rc rc = LC_OK;
    if (count == 0)
        goto out;
    const char *p[2] = {IDX_SERVICE, ids};
    if ((rc = lc_db_exec_static(db, claim_sql, 2, p, &res, err)) != LC_OK)
        goto out;
    if ((size_t)PQntuples(res) == count) { /* the usual case: every event is new */
        for (size_t i = 0; i < n; i++)
            claimed[i] = wants_claim(&items[i]);
        goto out;
    }
    for (int r = 0; r < PQntuples(res); r++)
        mark_ids(items, n, PQgetvalue(res, r, 0), wants_claim, claimed);
out:
    PQclear(res);
    free(ids);
    return rc;
}

static lc_rc add_quarantine(lc_db *db, const idx_ctx *x, const idx_item *it, lc_err *err)
{
    const lc_kafka_msg *m = it->msg;
    char source[512];
    snprintf(source, sizeof(source), "kafka:%s/%d@%lld", m->topic, (int)m->partition,
             (long long)m->offset);
    idx_utf8_fix(source);
    const char *p[4] = {source, it->qkey ? it->qkey : it->key, it->reason,
                        it->ev ? it->ev->id : NULL};
    lc_rc rc = lc_db_exec(db, quarantine_sql, 4, p, NULL, err);
    if (rc == LC_OK)
        rc = lc_outbox_add_dlq(db, x->prefix, IDX_SERVICE, m->topic, m->partition, m->offset,
                               m->key, m->key_len, m->payload, m->len, it->reason, err);
    return rc;
}

/* ---- the COPY rows ---------------------------------------------------------------------- */

/* A growing buffer; on allocation failure it stops growing and remembers it. */
typedef struct buf {
    char *p;
    size_t len, cap;
    int oom;
} buf;

static void b_reserve(buf *b, size_t more)
{
    if (b->oom || b->len + more <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 64 * 1024;
    while (cap < b->len + more)
        cap *= 2;
    char *np = realloc(b->p, cap);
    if (!np) {
        b->oom = 1;
        return;
    }
    b->p = np;
    b->cap = cap;
}

static void b_add(buf *b, const char *s, size_t n)
{
    b_reserve(b, n);
    if (b->oom)
        return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void b_addf(buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void b_addf(buf *b, const char *fmt, ...)
{
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n > 0)
        b_add(b, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

/* A text value in COPY's text format: \N for NULL; backslash, tab, newline and carriage
 * return escaped. */
static void put_text(buf *b, const char *s)
{
    if (!s) {
        b_add(b, "\\N", 2);
        return;
    }
    size_t n = strlen(s);
    b_reserve(b, 2 * n);
    if (b->oom)
        return;
    for (size_t i = 0; i < n; i++) {
        const char c = s[i];
        char *o = b->p + b->len;
        switch (c) {
        case '\\':
            o[0] = '\\', o[1] = '\\', b->len += 2;
            break;
        case '\t':
            o[0] = '\\', o[1] = 't', b->len += 2;
            break;
        case '\n':
            o[0] = '\\', o[1] = 'n', b->len += 2;
            break;
        case '\r':
            o[0] = '\\', o[1] = 'r', b->len += 2;
            break;
        default:
            o[0] = c, b->len += 1;
        }
    }
}

/* One text field after the first: the tab before it, then the value. */
static void f_str(buf *b, const char *s)
{
    b_add(b, "\t", 1);
    put_text(b, s);
}

/* Attributes that DICOM leaves at 0 when absent are stored as NULL. */
static void f_pos(buf *b, int v)
{
    if (v > 0)
        b_addf(b, "\t%d", v);
    else
        b_add(b, "\t\\N", 3);
}

static void f_dbls(buf *b, const double *v, int n, int has)
{
    for (int i = 0; has && i < n; i++)
        if (!isfinite(v[i]))
            has = 0; /* an unusable vector is left out */
    if (!has) {
        b_add(b, "\t\\N", 3);
        return;
    }
    b_add(b, "\t{", 2);
    for (int i = 0; i < n; i++)
        b_addf(b, "%s%.17g", i ? "," : "", v[i]);
    b_add(b, "}", 1);
}

/* Normalised strings an item needs, owned by the caller of stage_row. */
typedef struct norm {
    char *patient_key;
    char *dates[8]; /* birth, study date, study time, series date, series time, pps date,
                       pps time, (unused) */
    char *content_date, *content_time;
} norm;

static void norm_free(norm *z)
{
    free(z->patient_key);
    for (size_t i = 0; i < sizeof(z->dates) / sizeof(z->dates[0]); i++)
        free(z->dates[i]);
    free(z->content_date);
    free(z->content_time);
}

/* patient_key: issuer '|' PatientID (002's convention), NULL without a PatientID. */
static void stage_row(buf *b, const idx_item *it, size_t ord)
{
    const lc_dicom_header *h = it->h;
    norm z = {0};
    if (h->patient_id && *h->patient_id &&
        asprintf(&z.patient_key, "%s|%s", h->issuer_of_patient_id ? h->issuer_of_patient_id : "",
                 h->patient_id) < 0) {
        z.patient_key = NULL;
        b->oom = 1;
    }
    z.dates[0] = idx_norm_date(h->patient_birth_date);
    z.dates[1] = idx_norm_date(h->study_date);
    z.dates[2] = idx_norm_time(h->study_time);
    z.dates[3] = idx_norm_date(h->series_date);
    z.dates[4] = idx_norm_time(h->series_time);
    z.dates[5] = idx_norm_date(h->pps_start_date);
    z.dates[6] = idx_norm_time(h->pps_start_time);
    z.content_date = idx_norm_date(h->content_date);
    z.content_time = idx_norm_time(h->content_time);

    b_addf(b, "%zu", ord);
    f_str(b, h->study_instance_uid);
    f_str(b, z.patient_key);
    f_str(b, h->patient_id && *h->patient_id ? h->patient_id : NULL);
    f_str(b, h->issuer_of_patient_id);
    f_str(b, h->patient_name);
    f_str(b, z.dates[0]);
    f_str(b, h->patient_sex);
    f_str(b, z.dates[1]);
    f_str(b, z.dates[2]);
    f_str(b, h->accession_number);
    f_str(b, h->study_id);
    f_str(b, h->study_description);
    f_str(b, h->referring_physician_name);
    f_str(b, h->institution_name);
    f_str(b, h->timezone_offset);
    f_str(b, h->series_instance_uid);
    f_str(b, h->modality);
    f_pos(b, h->series_number);
    f_str(b, h->series_description);
    f_str(b, h->body_part_examined);
    f_str(b, z.dates[3]);
    f_str(b, z.dates[4]);
    f_str(b, z.dates[5]);
    f_str(b, z.dates[6]);
    f_str(b, h->request_attributes);
    f_str(b, h->sop_instance_uid);
    f_str(b, h->sop_class_uid);
    f_str(b, h->transfer_syntax_uid);
    f_pos(b, h->instance_number);
    f_pos(b, h->rows);
    f_pos(b, h->columns);
    f_pos(b, h->number_of_frames);
    f_pos(b, h->bits_allocated);
    f_str(b, z.content_date);
    f_str(b, z.content_time);
    f_dbls(b, h->ipp, 3, h->has_ipp);
    f_dbls(b, h->iop, 6, h->has_iop);
    f_dbls(b, h->pixel_spacing, 2, h->has_pixel_spacing);
    if (h->has_slice_thickness && isfinite(h->slice_thickness))
        b_addf(b, "\t%.17g", h->slice_thickness);
    else
        b_add(b, "\t\\N", 3);
    f_str(b, it->key);
    b_addf(b, "\t%lld", it->size);
    f_str(b, it->sha256);
    b_add(b, "\n", 1);
    norm_free(&z);
}

/* The failure of a statement run on the raw connection, classified like lc_db_exec's. */
static lc_rc pq_fail(lc_db *db, PGresult *r, const char *what, lc_err *err)
{
    PGconn *c = lc_db_conn(db);
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    char msg[400];
    snprintf(msg, sizeof(msg), "%s", r ? PQresultErrorMessage(r) : PQerrorMessage(c));
    for (char *q = msg; *q; q++)
        if (*q == '\n' || *q == '\t')
            *q = ' ';
    lc_rc rc = LC_ERR_DB;
    if (PQstatus(c) != CONNECTION_OK || (state && strncmp(state, "08", 2) == 0))
        rc = LC_ERR_UNAVAILABLE;
    else if (state && (strcmp(state, "40001") == 0 || strcmp(state, "40P01") == 0))
        rc = LC_ERR_CONFLICT;
    return lc_err_set(err, rc, "could not %s: %s (SQLSTATE %s)", what, msg, state ? state : "none");
}

/* COPY rows (b) with sql ("COPY ... FROM STDIN"). */
static lc_rc copy_rows(lc_db *db, const char *sql, const buf *b, lc_err *err)
{
    PGconn *c = lc_db_conn(db);
    PGresult *r = PQexec(c, sql);
    if (PQresultStatus(r) != PGRES_COPY_IN) {
        lc_rc rc = pq_fail(db, r, "start the COPY of the batch", err);
        PQclear(r);
        return rc;
    }
    PQclear(r);
    int ok = 1;
    for (size_t off = 0; ok && off < b->len;) {
        size_t n = b->len - off < (1u << 20) ? b->len - off : (1u << 20);
        ok = PQputCopyData(c, b->p + off, (int)n) == 1;
        off += n;
    }
    if (PQputCopyEnd(c, ok ? NULL : "aborted") != 1)
        ok = 0;
    lc_rc rc = LC_OK;
    while ((r = PQgetResult(c)) != NULL) {
        if (rc == LC_OK && PQresultStatus(r) != PGRES_COMMAND_OK)
            rc = pq_fail(db, r, "COPY the batch", err);
        PQclear(r);
    }
    if (rc == LC_OK && !ok)
        rc = pq_fail(db, NULL, "COPY the batch", err);
    return rc;
}

static int sop_cmp(const void *a, const void *b)
{
    const idx_item *const *x = a, *const *y = b;
    return strcmp((*x)->sop_uid, (*y)->sop_uid);
}

/* One instance_metadata row: the SOPInstanceUID and the DICOM JSON. */
static void md_row(buf *b, const idx_item *it)
{
    put_text(b, it->h->sop_instance_uid);
    f_str(b, it->h->json ? it->h->json : "{}");
    b_add(b, "\n", 1);
}

/* Upsert patients, studies, series and instances of the items in w (READY and claimed; SOP
 * UIDs are unique among them), write the DICOM JSON of the new and changed ones and set each
 * one's result; the studies of the new and changed ones are appended to touched. */
static lc_rc write_instances(lc_db *db, idx_item **w, size_t m, cJSON *touched, lc_err *err)
{
    lc_rc rc = LC_OK;
    PGresult *res = NULL;
    char *replaced_s = NULL;
    cJSON *replaced = cJSON_CreateArray();
    buf b = {0}, md = {0};
    size_t nmd = 0;
    if (!replaced)
        goto nomem;
    for (size_t j = 0; j < m; j++)
        stage_row(&b, w[j], j);
    if (b.oom)
        goto nomem;
    if ((rc = lc_db_exec(db, unstage_sql, 0, NULL, NULL, err)) != LC_OK ||
        (rc = copy_rows(db, copy_sql, &b, err)) != LC_OK ||
        /* prepared once per session: staging table scan, sort, insert whatever its size */
        (rc = lc_db_exec_static(db, upsert_patients_sql, 0, NULL, NULL, err)) != LC_OK ||
        (rc = lc_db_exec_static(db, upsert_studies_sql, 0, NULL, NULL, err)) != LC_OK ||
        (rc = lc_db_exec_static(db, upsert_series_sql, 0, NULL, NULL, err)) != LC_OK ||
        (rc = lc_db_exec(db, upsert_instances_sql, 0, NULL, &res, err)) != LC_OK)
        goto out;

    /* rows come back for new ('i') or changed ('r') instances, and for known ones without
     * their DICOM JSON ('m'): the rest were duplicates */
    qsort(w, m, sizeof(*w), sop_cmp);
    for (size_t j = 0; j < m; j++)
        w[j]->result = IDX_R_DUPLICATE;
    for (int r = 0; r < PQntuples(res); r++) {
        idx_item key = {.sop_uid = PQgetvalue(res, r, 0)}, *kp = &key;
        idx_item **hit = bsearch(&kp, w, m, sizeof(*w), sop_cmp);
        const char what = PQgetvalue(res, r, 1)[0];
        if (!hit) {
            rc = lc_err_set(err, LC_ERR_INTERNAL, "upsert returned an unknown instance");
            goto out;
        }
        md_row(&md, *hit);
        nmd++;
        if (what == 'm')
            continue;
        (*hit)->result = what == 'i' ? IDX_R_INSERTED : IDX_R_REPLACED;
        cJSON *s = cJSON_CreateString((*hit)->study_uid);
        if (!s || !cJSON_AddItemToArray(touched, s)) {
            cJSON_Delete(s);
            goto nomem;
        }
        if (what == 'r') {
            cJSON *u = cJSON_CreateString((*hit)->sop_uid);
            if (!u || !cJSON_AddItemToArray(replaced, u)) {
                cJSON_Delete(u);
                goto nomem;
            }
        }
    }
    if (md.oom)
        goto nomem;
    if (cJSON_GetArraySize(replaced) > 0) {
        if (!(replaced_s = cJSON_PrintUnformatted(replaced)))
            goto nomem;
        const char *p[1] = {replaced_s};
        if ((rc = lc_db_exec(db, drop_md_sql, 1, p, NULL, err)) != LC_OK)
            goto out;
    }
    if (nmd > 0)
        rc = copy_rows(db, copy_md_sql, &md, err);
    goto out;
nomem:
    rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory building the index rows");
out:
    PQclear(res);
    cJSON_Delete(replaced);
    free(replaced_s);
    free(b.p);
    free(md.p);
    return rc;
}

/* Wait for the objects of items [from, to) (the parse pool); 0 when none failed transiently,
 * else the failure is recorded in wr. */
static int loaded(idx_write *wr, size_t from, size_t to)
{
    idx_pool_wait(wr->x->pool, from, to);
    for (size_t i = from; i < to; i++) {
        if (wr->items[i].load_rc != LC_OK) {
            wr->load_rc = wr->items[i].load_rc;
            snprintf(wr->load_err, sizeof(wr->load_err), "%s", wr->items[i].load_err);
            return -1;
        }
    }
    return 0;
}

/* Among the deferred items (a SOPInstanceUID repeated in the batch) that are READY once
 * loaded, only the last of each SOPInstanceUID is written: the others are superseded, so a
 * multi-row upsert never touches a row twice and the latest file wins. */
static void supersede(idx_item *items, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        idx_item *it = &items[i];
        if (!it->deferred || it->state != IDX_READY)
            continue;
        for (size_t j = i + 1; j < n; j++) {
            if (items[j].deferred && items[j].state == IDX_READY &&
                strcmp(items[j].sop_uid, it->sop_uid) == 0) {
                it->state = IDX_SUPERSEDED;
                lc_dicom_header_free(it->h);
                it->h = NULL;
                break;
            }
        }
    }
}

lc_rc idx_db_write(lc_db *db, void *ctx, lc_err *err)
{
    idx_write *wr = ctx;
    idx_item *items = wr->items;
    size_t n = wr->n;
    lc_rc rc;
    char *touched_s = NULL;
    cJSON *touched = cJSON_CreateArray();
    int *claimed = calloc(n ? n : 1, sizeof(*claimed));
    idx_item **w = calloc(n ? n : 1, sizeof(*w));
    if (!claimed || !w || !touched) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        items[i].result = IDX_R_DUPLICATE; /* skipped, superseded or claimed elsewhere */
    if ((rc = claim_events(db, items, n, claimed, err)) != LC_OK ||
        (rc = lc_db_exec(db, stage_sql, 0, NULL, NULL, err)) != LC_OK)
        goto out;
    /* chunk by chunk as the pool loads them: this chunk's rows go to PostgreSQL while the
     * pool parses the next chunk's objects; deferred items wait for the end */
    for (size_t from = 0; from < n; from += IDX_WRITE_CHUNK) {
        size_t to = from + IDX_WRITE_CHUNK < n ? from + IDX_WRITE_CHUNK : n, m = 0;
        if (loaded(wr, from, to) != 0) {
            rc = lc_err_set(err, LC_ERR_CANCELLED, "%s", wr->load_err);
            goto out;
        }
        for (size_t i = from; i < to; i++)
            if (items[i].state == IDX_READY && claimed[i] && !items[i].deferred)
                w[m++] = &items[i];
        if (m > 0 && (rc = write_instances(db, w, m, touched, err)) != LC_OK)
            goto out;
    }
    wr->loaded_ms = lc_now_ms();
    supersede(items, n);
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        idx_item *it = &items[i];
        /* an invalid event has no id to claim: it is quarantined on every delivery */
        if (it->state == IDX_QUARANTINE && (claimed[i] || !it->ev)) {
            if ((rc = add_quarantine(db, wr->x, it, err)) != LC_OK)
                goto out;
            it->result = IDX_R_QUARANTINED;
        } else if (it->state == IDX_READY && claimed[i] && it->deferred) {
            w[m++] = it;
        }
    }
    if (m > 0 && (rc = write_instances(db, w, m, touched, err)) != LC_OK)
        goto out;
    if (cJSON_GetArraySize(touched) > 0) {
        if (!(touched_s = cJSON_PrintUnformatted(touched))) {
            rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory");
            goto out;
        }
        const char *p[1] = {touched_s};
        /* planned on every call, like seen_sql: see recount_sql */
        if ((rc = lc_db_exec(db, recount_sql, 1, p, NULL, err)) != LC_OK)
            goto out;
    }
    if (wr->sources) {
        const char *p[1] = {wr->sources};
        rc = lc_db_exec_static(db, sources_sql, 1, p, NULL, err);
    }
out:
    cJSON_Delete(touched);
    free(touched_s);
    free(claimed);
    free(w);
    return rc;
}
