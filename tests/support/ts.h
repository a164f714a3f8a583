/*
 * ts.h: helpers shared by radpipe's tests: paths (repo root, built binaries, test data, the
 * shared DICOM samples), temporary directories, free ports, and a fresh database per test on
 * the real PostgreSQL server that tests/run.sh starts (RADPIPE_TEST_PG_URL).
 * Single-threaded test code; returned strings are malloc'd unless noted.
 */
#ifndef TS_H
#define TS_H

#include <stddef.h>

/* Repository root (RADPIPE_TEST_ROOT, else the current directory). Borrowed. */
const char *ts_root(void);
/* Directory of the built executables (RADPIPE_TEST_BIN, else build/test/bin). Borrowed. */
const char *ts_bin_dir(void);
/* ts_bin_dir()/name. */
char *ts_bin(const char *name);
/* tests/data/rel under the root. */
char *ts_data(const char *rel);
/* The shared DICOM corpus: RADPIPE_SAMPLES_DIR, ../shared/dicom-samples beside the root, or
 * /work/shared/dicom-samples; NULL when none exists. Borrowed. */
const char *ts_samples_dir(void);

/* The bundled 4-slice MR series (tests/data/series/mr-4slice/jpeg-lossless-sv1), or its
 * original in the shared corpus; aborts the test when neither exists. */
char *ts_test_series(void);
/* The regular files of dir sorted by name (NULL-terminated; free with ts_strv_free). */
char **ts_list_files(const char *dir);
void ts_strv_free(char **v);

/* Write n copies of the DICOM file src into dir as slice-NNNN.dcm, each with its own SOP
 * Instance UID, InstanceNumber and ImagePositionPatient (axial, 1 mm apart along z), all in
 * the given study and series (DCMTK's dcmodify). Returns 0 on success. */
int ts_make_series(const char *src, int n, const char *dir, const char *study_uid,
                   const char *series_uid);

/* A new directory under $TMPDIR (or /tmp) with mode 0755 (PostgreSQL, run as another user
 * in the stack, must be able to traverse it). */
char *ts_tmpdir(const char *tag);
/* rm -rf path (no-op for NULL). */
void ts_rmrf(const char *path);
/* A TCP port on 127.0.0.1 that was free a moment ago. */
int ts_free_port(void);

/* The URL of a new, empty database on the test server, named after tag and the pid; NULL
 * when RADPIPE_TEST_PG_URL is not set (the caller then fails or skips explicitly). */
char *ts_pg_fresh_db(const char *tag);

/* The command lines (one per line) of live processes, other than this one, whose command
 * line or working directory mentions needle; "" when none. Caller frees. */
char *ts_procs_mentioning(const char *needle);

/* Read a whole file; NULL when it cannot be read. *len may be NULL. */
char *ts_read_file(const char *path, size_t *len);
/* Write a file (0644); returns 0 on success. */
int ts_write_file(const char *path, const void *buf, size_t len);

/* Run a shell command, capturing stdout (caller frees) and returning the exit status
 * (-1 when it could not run). */
int ts_run(const char *cmd, char **out);

#endif
