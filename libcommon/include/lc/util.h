/*
 * util.h: small helpers shared by every module: UUIDs, SHA-256 (OpenSSL EVP), monotonic and
 * wall clocks, RFC 3339 timestamps, bounded string copies, whole-file reads.
 * All functions are thread-safe and keep no state.
 */
#ifndef LC_UTIL_H
#define LC_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdatomic.h>
#include "lc/rc.h"

#define LC_UUID_LEN 36 /* without the NUL */

/* Random (version 4) UUID in lowercase canonical form; out has room for 37 bytes. */
void lc_uuid_v4(char out[LC_UUID_LEN + 1]);
/* 1 when s is a canonical UUID (any version, either case). */
int lc_uuid_valid(const char *s);

/* SHA-256 as 64 lowercase hex digits + NUL. */
typedef struct lc_sha256 lc_sha256; /* incremental hashing, caller frees with _free */
lc_sha256 *lc_sha256_new(void);
void lc_sha256_update(lc_sha256 *h, const void *buf, size_t len);
void lc_sha256_final_hex(lc_sha256 *h, char out[65]); /* resets nothing: call once */
void lc_sha256_free(lc_sha256 *h);
void lc_sha256_hex(const void *buf, size_t len, char out[65]);
lc_rc lc_sha256_file_hex(const char *path, char out[65], long long *size_out, lc_err *err);

/* Fill buf with cryptographically random bytes (getrandom). */
lc_rc lc_random_bytes(void *buf, size_t len);
/* Constant-time comparison of two equal-length buffers: 1 when equal. */
int lc_ct_equal(const void *a, const void *b, size_t len);

/* Monotonic milliseconds (CLOCK_MONOTONIC) and wall-clock milliseconds since the epoch. */
int64_t lc_now_ms(void);
int64_t lc_wall_ms(void);
/* RFC 3339 UTC with milliseconds, "2026-11-21T12:00:00.123Z"; out has room for 32 bytes. */
void lc_time_rfc3339(int64_t wall_ms, char out[32]);
#ifndef __cplusplus /* C11 atomics; the C++ files (GDCM glue) do not sleep */
/* Sleep up to ms milliseconds, returning early (with 1) once *stop becomes non-zero. */
int lc_sleep_ms(int ms, const atomic_int *stop);
#endif

/* strlcpy semantics: always NUL-terminates, returns strlen(src). */
size_t lc_strlcpy(char *dst, const char *src, size_t cap);
/* Read a whole file into a NUL-terminated buffer (caller frees); fails above max bytes. */
lc_rc lc_read_file(const char *path, size_t max, char **out, size_t *len, lc_err *err);
/* mkdir -p with mode for created components. */
lc_rc lc_mkdirs(const char *path, unsigned mode, lc_err *err);
/* Join a "file://" URL's path: "file://var/x" -> "var/x", "file:///abs" -> "/abs".
 * Returns NULL when url is not file://. Borrowed pointer into url. */
const char *lc_file_url_path(const char *url);

#endif
