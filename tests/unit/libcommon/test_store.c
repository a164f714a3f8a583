/*
 * test_store.c: the file:// object store on a real temporary directory: round trips, listing,
 * streaming writers, MOVE, atomic overwrite, traversal and symlink escapes (with openat2 and
 * with the O_NOFOLLOW fallback), leftover temporary files, URL normalisation, concurrent puts.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "lc/store.h"
#include "../../../libcommon/store_internal.h"
#include "ts.h"

typedef struct fixture {
    char *tmp;  /* test directory: store/ and outside/ beneath it */
    char *root; /* tmp/store */
    char *outside;
    lc_store *s;
} fixture;

static char *xfmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xfmt(const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;
    va_start(ap, fmt);
    assert_true(vasprintf(&s, fmt, ap) >= 0);
    va_end(ap);
    return s;
}

static int setup_mode(void **state, int fallback)
{
    fixture *f = calloc(1, sizeof(*f));
    f->tmp = ts_tmpdir("store");
    f->root = xfmt("%s/store", f->tmp);
    f->outside = xfmt("%s/outside", f->tmp);
    if (mkdir(f->outside, 0755) != 0)
        return -1;
    char *url = xfmt("file://%s", f->root);
    lc_err err = {0};
    lc_rc rc = lc_store_open(url, &f->s, &err);
    free(url);
    if (rc != LC_OK) {
        fprintf(stderr, "open: %s\n", lc_err_msg(&err));
        return -1;
    }
    if (fallback)
        lc_store_file_force_fallback(f->s);
    *state = f;
    return 0;
}

static int setup(void **state)
{
    return setup_mode(state, 0);
}

static int setup_fallback(void **state)
{
    return setup_mode(state, 1);
}

static int teardown(void **state)
{
    fixture *f = *state;
    lc_store_free(f->s);
    ts_rmrf(f->tmp);
    free(f->tmp);
    free(f->root);
    free(f->outside);
    free(f);
    return 0;
}

/* Number of entries beneath dir (recursive, not following links) whose name contains needle,
 * or all entries when needle is NULL. */
static int count_entries(const char *dir, const char *needle)
{
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (!needle || strstr(de->d_name, needle))
            n++;
        char *sub = xfmt("%s/%s", dir, de->d_name);
        struct stat st;
        if (lstat(sub, &st) == 0 && S_ISDIR(st.st_mode))
            n += count_entries(sub, needle);
        free(sub);
    }
    closedir(d);
    return n;
}

static void assert_object(lc_store *s, const char *key, const void *want, size_t wlen)
{
    void *buf = NULL;
    size_t len = 0;
    lc_err err = {0};
    assert_int_equal(lc_store_get_buf(s, key, 1 << 24, &buf, &len, &err), LC_OK);
    assert_int_equal(len, wlen);
    assert_memory_equal(buf, want, wlen);
    free(buf);
}

/* --- round trips ------------------------------------------------------------------------ */

static void test_put_get_head_delete(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    const char data[] = "DICM payload\0with a NUL";
    int64_t before = 0;
    {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        before = (int64_t)ts.tv_sec * 1000 - 1000;
    }
    assert_int_equal(
        lc_store_put_buf(f->s, "studies/1.2.3/series/4/5.dcm", data, sizeof(data), &err), LC_OK);
    assert_object(f->s, "studies/1.2.3/series/4/5.dcm", data, sizeof(data));

    lc_store_stat st = {0};
    assert_int_equal(lc_store_head(f->s, "studies/1.2.3/series/4/5.dcm", &st, &err), LC_OK);
    assert_int_equal(st.size, sizeof(data));
    assert_true(st.mtime_ms >= before);

    /* get_buf: NUL-terminated, and the limit is enforced */
    void *buf = NULL;
    size_t len = 0;
    assert_int_equal(
        lc_store_get_buf(f->s, "studies/1.2.3/series/4/5.dcm", sizeof(data), &buf, &len, &err),
        LC_OK);
    assert_int_equal(((char *)buf)[len], '\0');
    free(buf);
    buf = NULL;
    assert_int_equal(
        lc_store_get_buf(f->s, "studies/1.2.3/series/4/5.dcm", sizeof(data) - 1, &buf, &len, &err),
        LC_ERR_TOO_LARGE);
    assert_null(buf);

    /* empty objects are objects */
    assert_int_equal(lc_store_put_buf(f->s, "empty", NULL, 0, &err), LC_OK);
    assert_int_equal(lc_store_head(f->s, "empty", &st, &err), LC_OK);
    assert_int_equal(st.size, 0);

    /* a directory is not an object */
    assert_int_equal(lc_store_head(f->s, "studies/1.2.3", &st, &err), LC_ERR_NOT_FOUND);
    assert_int_equal(lc_store_get_buf(f->s, "studies", 100, &buf, &len, &err), LC_ERR_NOT_FOUND);

    assert_int_equal(lc_store_delete(f->s, "studies/1.2.3/series/4/5.dcm", &err), LC_OK);
    assert_int_equal(lc_store_head(f->s, "studies/1.2.3/series/4/5.dcm", &st, &err),
                     LC_ERR_NOT_FOUND);
    assert_int_equal(lc_store_get_buf(f->s, "studies/1.2.3/series/4/5.dcm", 100, &buf, &len, &err),
                     LC_ERR_NOT_FOUND);
    assert_non_null(strstr(lc_err_msg(&err), "studies/1.2.3/series/4/5.dcm"));
    /* deleting what is missing, or under a missing directory, is fine */
    assert_int_equal(lc_store_delete(f->s, "studies/1.2.3/series/4/5.dcm", &err), LC_OK);
    assert_int_equal(lc_store_delete(f->s, "no/such/dir/x", &err), LC_OK);
    assert_int_equal(lc_store_delete(f->s, "studies", &err), LC_OK);
    assert_int_equal(count_entries(f->root, ".tmp-"), 0);
}

static void test_get_file(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    assert_int_equal(lc_store_put_buf(f->s, "a/obj", "new content", 11, &err), LC_OK);
    char *dst = xfmt("%s/copy.bin", f->outside);
    assert_int_equal(ts_write_file(dst, "old", 3), 0);
    assert_int_equal(lc_store_get_file(f->s, "a/obj", dst, &err), LC_OK);
    size_t len = 0;
    char *got = ts_read_file(dst, &len);
    assert_string_equal(got, "new content");
    free(got);
    assert_int_equal(count_entries(f->outside, ".tmp-"), 0);
    assert_int_equal(count_entries(f->outside, NULL), 1);

    /* missing object: destination untouched, nothing left behind */
    assert_int_equal(lc_store_get_file(f->s, "a/missing", dst, &err), LC_ERR_NOT_FOUND);
    got = ts_read_file(dst, NULL);
    assert_string_equal(got, "new content");
    free(got);
    /* missing destination directory */
    char *bad = xfmt("%s/nodir/x", f->outside);
    assert_int_not_equal(lc_store_get_file(f->s, "a/obj", bad, &err), LC_OK);
    assert_int_equal(count_entries(f->outside, NULL), 1);
    free(bad);
    free(dst);
}

static int collect(void *ctx, const char *key, const lc_store_stat *st)
{
    char *buf = ctx;
    char line[1200];
    snprintf(line, sizeof(line), "%s=%lld;", key, (long long)st->size);
    strcat(buf, line);
    return 0;
}

static int stop_after_one(void *ctx, const char *key, const lc_store_stat *st)
{
    (void)key;
    (void)st;
    (*(int *)ctx)++;
    return 1;
}

/* Listing results sorted, so the comparison does not depend on directory order. */
static char *list_sorted(lc_store *s, const char *prefix, lc_rc *rc)
{
    char *buf = calloc(1, 1 << 16);
    lc_err err = {0};
    *rc = lc_store_list(s, prefix, collect, buf, &err);
    char *items[64];
    int n = 0;
    for (char *tok = strtok(buf, ";"); tok && n < 64; tok = strtok(NULL, ";"))
        items[n++] = strdup(tok);
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && strcmp(items[j - 1], items[j]) > 0; j--) {
            char *t = items[j];
            items[j] = items[j - 1];
            items[j - 1] = t;
        }
    buf[0] = '\0';
    for (int i = 0; i < n; i++) {
        strcat(buf, items[i]);
        strcat(buf, ";");
        free(items[i]);
    }
    return buf;
}

static void test_list(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    lc_rc rc;
    assert_int_equal(lc_store_put_buf(f->s, "s1/a.dcm", "1", 1, &err), LC_OK);
    assert_int_equal(lc_store_put_buf(f->s, "s1/b.dcm", "22", 2, &err), LC_OK);
    assert_int_equal(lc_store_put_buf(f->s, "s1/sub/c.dcm", "333", 3, &err), LC_OK);
    assert_int_equal(lc_store_put_buf(f->s, "s10/d.dcm", "4444", 4, &err), LC_OK);
    assert_int_equal(lc_store_put_buf(f->s, "top", "55555", 5, &err), LC_OK);
    /* a temporary file from a crashed writer and a symlink are never listed */
    char *p = xfmt("%s/s1/.tmp-0123456789abcdef", f->root);
    assert_int_equal(ts_write_file(p, "partial", 7), 0);
    free(p);
    p = xfmt("%s/s1/link", f->root);
    assert_int_equal(symlink("a.dcm", p), 0);
    free(p);

    char *got = list_sorted(f->s, "", &rc);
    assert_int_equal(rc, LC_OK);
    assert_string_equal(got, "s1/a.dcm=1;s1/b.dcm=2;s1/sub/c.dcm=3;s10/d.dcm=4;top=5;");
    free(got);
    got = list_sorted(f->s, "s1/", &rc);
    assert_string_equal(got, "s1/a.dcm=1;s1/b.dcm=2;s1/sub/c.dcm=3;");
    free(got);
    got = list_sorted(f->s, "s1", &rc);
    assert_string_equal(got, "s1/a.dcm=1;s1/b.dcm=2;s1/sub/c.dcm=3;s10/d.dcm=4;");
    free(got);
    got = list_sorted(f->s, "s1/b", &rc);
    assert_string_equal(got, "s1/b.dcm=2;");
    free(got);
    got = list_sorted(f->s, "nothing/here/", &rc);
    assert_int_equal(rc, LC_OK);
    assert_string_equal(got, "");
    free(got);
    got = list_sorted(f->s, "../", &rc);
    assert_int_equal(rc, LC_ERR_INVALID);
    free(got);

    int calls = 0;
    assert_int_equal(lc_store_list(f->s, "", stop_after_one, &calls, &err), LC_OK);
    assert_int_equal(calls, 1);
}

static void test_local_path(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    char *path = NULL;
    assert_int_equal(lc_store_put_buf(f->s, "x/y.bin", "abc", 3, &err), LC_OK);
    assert_int_equal(lc_store_local_path(f->s, "x/y.bin", &path, &err), LC_OK);
    char *want = xfmt("%s/x/y.bin", f->root);
    char *real = realpath(want, NULL);
    assert_string_equal(path, real);
    char *got = ts_read_file(path, NULL);
    assert_string_equal(got, "abc");
    free(got);
    free(real);
    free(want);
    free(path);
    path = NULL;
    assert_int_equal(lc_store_local_path(f->s, "x/missing", &path, &err), LC_ERR_NOT_FOUND);
    assert_null(path);
}

static void test_writer(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    lc_store_writer *w = NULL;
    lc_store_stat st;
    assert_int_equal(lc_store_writer_open(f->s, "w/obj", &w, &err), LC_OK);
    char chunk[4096];
    memset(chunk, 'z', sizeof(chunk));
    for (int i = 0; i < 10; i++)
        assert_int_equal(lc_store_writer_write(w, chunk, sizeof(chunk), &err), LC_OK);
    /* invisible until commit */
    assert_int_equal(lc_store_head(f->s, "w/obj", &st, &err), LC_ERR_NOT_FOUND);
    assert_int_equal(lc_store_writer_commit(w, &err), LC_OK);
    assert_int_equal(lc_store_head(f->s, "w/obj", &st, &err), LC_OK);
    assert_int_equal(st.size, 10 * sizeof(chunk));

    /* abort: the old object stays, no temporary file stays */
    assert_int_equal(lc_store_writer_open(f->s, "w/obj", &w, &err), LC_OK);
    assert_int_equal(lc_store_writer_write(w, "short", 5, &err), LC_OK);
    assert_int_equal(count_entries(f->root, ".tmp-"), 1);
    lc_store_writer_abort(w);
    assert_int_equal(count_entries(f->root, ".tmp-"), 0);
    assert_int_equal(lc_store_head(f->s, "w/obj", &st, &err), LC_OK);
    assert_int_equal(st.size, 10 * sizeof(chunk));
    lc_store_writer_abort(NULL);

    /* a new key aborted leaves no object */
    assert_int_equal(lc_store_writer_open(f->s, "w/new", &w, &err), LC_OK);
    lc_store_writer_abort(w);
    assert_int_equal(lc_store_head(f->s, "w/new", &st, &err), LC_ERR_NOT_FOUND);
    assert_int_equal(count_entries(f->root, ".tmp-"), 0);
}

static void test_put_file_and_move(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    char *src = xfmt("%s/src.dcm", f->outside);
    assert_int_equal(ts_write_file(src, "copied", 6), 0);
    assert_int_equal(lc_store_put_file(f->s, "p/copy", src, 0, &err), LC_OK);
    assert_object(f->s, "p/copy", "copied", 6);
    assert_int_equal(access(src, F_OK), 0); /* a copy leaves the source */

    /* MOVE on the same file system renames: same inode, source gone */
    struct stat before, after;
    assert_int_equal(ts_write_file(src, "moved", 5), 0);
    assert_int_equal(stat(src, &before), 0);
    assert_int_equal(lc_store_put_file(f->s, "p/moved", src, LC_STORE_MOVE, &err), LC_OK);
    assert_int_equal(access(src, F_OK), -1);
    char *dst = xfmt("%s/p/moved", f->root);
    assert_int_equal(stat(dst, &after), 0);
    assert_int_equal(before.st_ino, after.st_ino);
    assert_object(f->s, "p/moved", "moved", 5);
    free(dst);

    /* MOVE of a file with another hard link copies (the link must not alias the object) */
    char *other = xfmt("%s/other-link", f->outside);
    assert_int_equal(ts_write_file(src, "linked", 6), 0);
    assert_int_equal(link(src, other), 0);
    assert_int_equal(lc_store_put_file(f->s, "p/linked", src, LC_STORE_MOVE, &err), LC_OK);
    assert_int_equal(access(src, F_OK), -1);
    assert_int_equal(ts_write_file(other, "changed", 7), 0);
    assert_object(f->s, "p/linked", "linked", 6);
    free(other);

    /* missing source */
    assert_int_equal(lc_store_put_file(f->s, "p/none", src, 0, &err), LC_ERR_NOT_FOUND);
    assert_int_equal(lc_store_put_file(f->s, "p/none", f->outside, 0, &err), LC_ERR_INVALID);
    assert_int_equal(count_entries(f->root, ".tmp-"), 0);
    free(src);
}

static void test_overwrite_is_atomic(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    assert_int_equal(lc_store_put_buf(f->s, "o/obj", "version one", 11, &err), LC_OK);
    char *path = xfmt("%s/o/obj", f->root);
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    assert_int_equal(lc_store_put_buf(f->s, "o/obj", "version two!", 12, &err), LC_OK);
    char buf[64] = {0};
    assert_int_equal(pread(fd, buf, sizeof(buf) - 1, 0), 11);
    assert_string_equal(buf, "version one");
    close(fd);
    assert_object(f->s, "o/obj", "version two!", 12);
    free(path);
}

/* --- keys and escapes ------------------------------------------------------------------- */

static void test_key_valid(void **state)
{
    (void)state;
    assert_true(lc_store_key_valid("a"));
    assert_true(lc_store_key_valid("studies/1.2.840/x.dcm"));
    assert_true(lc_store_key_valid("a/..b/c.."));
    assert_true(lc_store_key_valid("é/ü"));
    const char *bad[] = {"",  "/abs", "../x", "a/../../x", "a//b",   "a/./b",     "a\\b",   "a/",
                         ".", "..",   "a/.",  "a/..",      "x\x01y", "tab\there", "del\x7f"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_false(lc_store_key_valid(bad[i]));
    assert_false(lc_store_key_valid(NULL));
    char long_key[1100];
    memset(long_key, 'k', sizeof(long_key));
    long_key[1024] = '\0';
    assert_true(lc_store_key_valid(long_key));
    long_key[1024] = 'k';
    long_key[1025] = '\0';
    assert_false(lc_store_key_valid(long_key));
}

static void test_traversal_rejected(void **state)
{
    fixture *f = *state;
    const char *bad[] = {
        "../x", "a/../../x", "/abs", "a//b",    "a/./b",           "a\\b", "x\ny", "../outside/x",
        "..",   "",          "a/",   "ctl\x1b", "../../etc/passwd"};
    int before = count_entries(f->tmp, NULL);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        const char *k = bad[i];
        lc_err err = {0};
        void *buf = NULL;
        size_t len;
        lc_store_stat st;
        char *path = NULL;
        lc_store_writer *w = NULL;
        assert_int_equal(lc_store_put_buf(f->s, k, "x", 1, &err), LC_ERR_INVALID);
        assert_non_null(strstr(lc_err_msg(&err), "invalid object key"));
        assert_int_equal(lc_store_get_buf(f->s, k, 10, &buf, &len, &err), LC_ERR_INVALID);
        assert_int_equal(lc_store_head(f->s, k, &st, &err), LC_ERR_INVALID);
        assert_int_equal(lc_store_delete(f->s, k, &err), LC_ERR_INVALID);
        assert_int_equal(lc_store_local_path(f->s, k, &path, &err), LC_ERR_INVALID);
        assert_int_equal(lc_store_writer_open(f->s, k, &w, &err), LC_ERR_INVALID);
        assert_null(w);
        char *dst = xfmt("%s/got", f->outside);
        assert_int_equal(lc_store_get_file(f->s, k, dst, &err), LC_ERR_INVALID);
        free(dst);
    }
    assert_int_equal(lc_store_put_buf(f->s, NULL, "x", 1, NULL), LC_ERR_INVALID);
    /* the temporary-file name pattern is reserved */
    assert_int_equal(lc_store_put_buf(f->s, "a/.tmp-0123456789abcdef", "x", 1, NULL),
                     LC_ERR_INVALID);
    assert_int_equal(count_entries(f->tmp, NULL), before);
}

static void test_symlink_escape(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    char *secret = xfmt("%s/secret", f->outside);
    assert_int_equal(ts_write_file(secret, "outside data", 12), 0);
    /* planted links: a directory link (absolute and relative) and a file link */
    char *p = xfmt("%s/evil", f->root);
    assert_int_equal(symlink(f->outside, p), 0);
    free(p);
    p = xfmt("%s/rel", f->root);
    assert_int_equal(symlink("../outside", p), 0);
    free(p);
    p = xfmt("%s/leak", f->root);
    assert_int_equal(symlink(secret, p), 0);
    free(p);
    int before = count_entries(f->outside, NULL);

    const char *through[] = {"evil/x", "rel/x", "evil/secret", "rel/secret", "evil/new/deep"};
    for (size_t i = 0; i < sizeof(through) / sizeof(through[0]); i++) {
        const char *k = through[i];
        void *buf = NULL;
        size_t len;
        lc_store_stat st;
        char *path = NULL;
        lc_store_writer *w = NULL;
        lc_rc rc = lc_store_put_buf(f->s, k, "pwned", 5, &err);
        assert_int_not_equal(rc, LC_OK);
        assert_int_not_equal(lc_store_get_buf(f->s, k, 100, &buf, &len, &err), LC_OK);
        assert_null(buf);
        assert_int_not_equal(lc_store_head(f->s, k, &st, &err), LC_OK);
        assert_int_not_equal(lc_store_local_path(f->s, k, &path, &err), LC_OK);
        assert_int_not_equal(lc_store_writer_open(f->s, k, &w, &err), LC_OK);
        char *src = xfmt("%s/src", f->tmp);
        assert_int_equal(ts_write_file(src, "pwned", 5), 0);
        assert_int_not_equal(lc_store_put_file(f->s, k, src, LC_STORE_MOVE, &err), LC_OK);
        unlink(src);
        free(src);
        /* a delete through the link either refuses or finds nothing beneath the root */
        rc = lc_store_delete(f->s, k, &err);
        assert_true(rc == LC_OK || rc == LC_ERR_INVALID);
    }
    /* the file link: reads refuse it */
    void *buf = NULL;
    size_t len;
    lc_store_stat st;
    assert_int_equal(lc_store_get_buf(f->s, "leak", 100, &buf, &len, &err), LC_ERR_INVALID);
    assert_non_null(strstr(lc_err_msg(&err), "outside the store"));
    assert_int_not_equal(lc_store_head(f->s, "leak", &st, &err), LC_OK);
    char *dst = xfmt("%s/copy", f->tmp);
    assert_int_not_equal(lc_store_get_file(f->s, "leak", dst, &err), LC_OK);
    assert_int_equal(access(dst, F_OK), -1);
    free(dst);
    /* a put at the link's key replaces the link inside the store, never writes through it */
    (void)lc_store_put_buf(f->s, "leak", "pwned", 5, &err);

    /* listing does not follow links out */
    lc_rc rc;
    char *listed = list_sorted(f->s, "", &rc);
    assert_int_equal(rc, LC_OK);
    assert_null(strstr(listed, "secret"));
    free(listed);

    /* nothing outside changed */
    assert_int_equal(count_entries(f->outside, NULL), before);
    char *got = ts_read_file(secret, NULL);
    assert_string_equal(got, "outside data");
    free(got);
    assert_int_equal(count_entries(f->root, ".tmp-"), 0);
    free(secret);
}

static void test_no_temp_files_after_failures(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    /* a directory in the way of the leaf, a file in the way of a directory */
    assert_int_equal(lc_store_put_buf(f->s, "d/inner", "x", 1, &err), LC_OK);
    assert_int_equal(lc_store_put_buf(f->s, "d", "x", 1, &err), LC_ERR_EXISTS);
    assert_int_equal(lc_store_put_buf(f->s, "d/inner/x", "x", 1, &err), LC_ERR_EXISTS);
    lc_store_writer *w = NULL;
    assert_int_equal(lc_store_writer_open(f->s, "d", &w, &err), LC_OK);
    assert_int_equal(lc_store_writer_write(w, "abc", 3, &err), LC_OK);
    assert_int_equal(lc_store_writer_commit(w, &err), LC_ERR_EXISTS);
    char *src = xfmt("%s/src", f->outside);
    assert_int_equal(ts_write_file(src, "abc", 3), 0);
    assert_int_equal(lc_store_put_file(f->s, "d", src, 0, &err), LC_ERR_EXISTS);
    assert_int_equal(lc_store_put_file(f->s, "d", src, LC_STORE_MOVE, &err), LC_ERR_EXISTS);
    assert_int_equal(access(src, F_OK), 0); /* a failed move keeps the source */
    free(src);
    assert_int_equal(count_entries(f->root, ".tmp-"), 0);
    assert_int_equal(count_entries(f->outside, ".tmp-"), 0);
    assert_object(f->s, "d/inner", "x", 1);
}

/* A real write error (EFBIG under RLIMIT_FSIZE): nothing published, nothing left behind. */
static void test_io_failure_leaves_nothing(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    size_t big = 64 * 1024;
    char *buf = calloc(1, big);
    assert_int_equal(lc_store_put_buf(f->s, "io/old", "old", 3, &err), LC_OK);
    char *src = xfmt("%s/big", f->outside);
    assert_int_equal(ts_write_file(src, buf, big), 0);

    struct rlimit saved, small = {.rlim_cur = 16 * 1024};
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &saved), 0);
    small.rlim_max = saved.rlim_max;
    void (*old_handler)(int) = signal(SIGXFSZ, SIG_IGN);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &small), 0);

    lc_rc put = lc_store_put_buf(f->s, "io/old", buf, big, &err);
    lc_rc copy = lc_store_put_file(f->s, "io/copied", src, 0, &err);
    lc_store_writer *w = NULL;
    lc_rc open_rc = lc_store_writer_open(f->s, "io/streamed", &w, &err);
    lc_rc wrote = lc_store_writer_write(w, buf, big, &err);
    lc_rc again = lc_store_writer_write(w, "x", 1, &err);
    lc_rc committed = lc_store_writer_commit(w, &err);

    assert_int_equal(setrlimit(RLIMIT_FSIZE, &saved), 0);
    signal(SIGXFSZ, old_handler);

    assert_int_equal(put, LC_ERR_IO);
    assert_int_equal(copy, LC_ERR_IO);
    assert_int_equal(open_rc, LC_OK);
    assert_int_equal(wrote, LC_ERR_IO);
    assert_int_equal(again, LC_ERR_INVALID);
    assert_int_not_equal(committed, LC_OK);
    assert_non_null(strstr(lc_err_msg(&err), "io/streamed"));
    assert_object(f->s, "io/old", "old", 3); /* the old object survives a failed overwrite */
    lc_store_stat st;
    assert_int_equal(lc_store_head(f->s, "io/copied", &st, &err), LC_ERR_NOT_FOUND);
    assert_int_equal(lc_store_head(f->s, "io/streamed", &st, &err), LC_ERR_NOT_FOUND);
    assert_int_equal(count_entries(f->root, ".tmp-"), 0);
    free(src);
    free(buf);
}

/* --- URLs ------------------------------------------------------------------------------- */

static void test_urls(void **state)
{
    fixture *f = *state;
    lc_err err = {0};
    lc_store *s = NULL;
    char cwd[PATH_MAX];
    assert_non_null(getcwd(cwd, sizeof(cwd)));
    assert_int_equal(chdir(f->tmp), 0);
    lc_rc rc = lc_store_open("file://rel/objects/", &s, &err);
    assert_int_equal(chdir(cwd), 0);
    assert_int_equal(rc, LC_OK);
    char *real = realpath(f->tmp, NULL);
    char *want = xfmt("file://%s/rel/objects", real);
    assert_string_equal(lc_store_url(s), want);
    /* the store works from any cwd once open */
    assert_int_equal(lc_store_put_buf(s, "k", "v", 1, &err), LC_OK);
    char *p = xfmt("%s/rel/objects/k", f->tmp);
    assert_int_equal(access(p, F_OK), 0);
    free(p);
    lc_store_free(s);
    free(want);

    /* an absolute URL with a trailing slash and ./ is normalised too */
    want = xfmt("file://%s/store", real);
    p = xfmt("file://%s/./store/", f->tmp);
    assert_int_equal(lc_store_open(p, &s, &err), LC_OK);
    assert_string_equal(lc_store_url(s), want);
    lc_store_free(s);
    free(p);
    free(want);
    free(real);

    s = (lc_store *)1;
    assert_int_equal(lc_store_open("s4://user:hunter2@host/bucket", &s, &err), LC_ERR_UNSUPPORTED);
    assert_null(s);
    assert_string_equal(lc_err_msg(&err), "unsupported object store URL scheme");
    assert_null(strstr(lc_err_msg(&err), "hunter2"));
    assert_int_equal(lc_store_open("file://", &s, &err), LC_ERR_CONFIG);
    assert_int_equal(lc_store_open(NULL, &s, &err), LC_ERR_CONFIG);
    /* a file where the directory should be */
    p = xfmt("%s/plain", f->tmp);
    assert_int_equal(ts_write_file(p, "x", 1), 0);
    char *url = xfmt("file://%s", p);
    assert_int_equal(lc_store_open(url, &s, &err), LC_ERR_IO);
    free(url);
    free(p);
    lc_store_free(NULL);
}

/* --- concurrency ------------------------------------------------------------------------ */

#define WRITERS  6
#define ROUNDS   25
#define OBJ_SIZE (256 * 1024)

typedef struct racer {
    lc_store *s;
    int id;
    int failures;
} racer;

static void *put_racer(void *arg)
{
    racer *r = arg;
    char *buf = malloc(OBJ_SIZE);
    memset(buf, 'A' + r->id, OBJ_SIZE);
    for (int i = 0; i < ROUNDS; i++) {
        lc_err err = {0};
        if (lc_store_put_buf(r->s, "race/key", buf, OBJ_SIZE, &err) != LC_OK)
            r->failures++;
    }
    free(buf);
    return NULL;
}

/* Every read must see one whole object: the right size, one writer's byte throughout. */
static void *read_racer(void *arg)
{
    racer *r = arg;
    for (int i = 0; i < ROUNDS * 4; i++) {
        void *buf = NULL;
        size_t len = 0;
        lc_rc rc = lc_store_get_buf(r->s, "race/key", OBJ_SIZE, &buf, &len, NULL);
        if (rc == LC_ERR_NOT_FOUND)
            continue;
        if (rc != LC_OK || len != OBJ_SIZE) {
            r->failures++;
        } else {
            const char *c = buf;
            for (size_t j = 1; j < len; j++)
                if (c[j] != c[0]) {
                    r->failures++;
                    break;
                }
        }
        free(buf);
    }
    return NULL;
}

static void test_concurrent_puts(void **state)
{
    fixture *f = *state;
    pthread_t th[WRITERS + 2];
    racer rs[WRITERS + 2];
    for (int i = 0; i < WRITERS + 2; i++) {
        rs[i] = (racer){.s = f->s, .id = i};
        assert_int_equal(pthread_create(&th[i], NULL, i < WRITERS ? put_racer : read_racer, &rs[i]),
                         0);
    }
    for (int i = 0; i < WRITERS + 2; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(rs[i].failures, 0);
    }
    void *buf = NULL;
    size_t len = 0;
    assert_int_equal(lc_store_get_buf(f->s, "race/key", OBJ_SIZE, &buf, &len, NULL), LC_OK);
    assert_int_equal(len, OBJ_SIZE);
    const char *c = buf;
    assert_true(c[0] >= 'A' && c[0] < 'A' + WRITERS);
    for (size_t j = 1; j < len; j++)
        if (c[j] != c[0])
            fail_msg("byte %zu is %c, byte 0 is %c", j, c[j], c[0]);
    free(buf);
    assert_int_equal(count_entries(f->root, ".tmp-"), 0);
    assert_int_equal(count_entries(f->root, NULL), 2); /* race/ and race/key */
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
/* the same test on the component-by-component walk used where openat2 is missing */
#define TF(fn)                                                                                     \
    {                                                                                              \
#fn "_fallback", fn, setup_fallback, teardown, NULL                                        \
    }

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_put_get_head_delete),
        T(test_get_file),
        T(test_list),
        T(test_local_path),
        T(test_writer),
        T(test_put_file_and_move),
        T(test_overwrite_is_atomic),
        cmocka_unit_test(test_key_valid),
        T(test_traversal_rejected),
        T(test_symlink_escape),
        TF(test_symlink_escape),
        TF(test_put_get_head_delete),
        TF(test_list),
        T(test_no_temp_files_after_failures),
        T(test_io_failure_leaves_nothing),
        T(test_urls),
        T(test_concurrent_puts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
