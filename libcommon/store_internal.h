/*
 * store_internal.h: the backend interface behind lc_store (store.c checks arguments and keys,
 * then dispatches here). One backend per URL scheme: file:// in store_file.c, s3:// in
 * store_s3*.c (store_s3_internal.h).
 * A backend owns its impl state; an lc_store is shared by threads, so backends keep no mutable
 * state in it after open. A writer belongs to one thread.
 */
#ifndef LC_STORE_INTERNAL_H
#define LC_STORE_INTERNAL_H

#include "lc/store.h"

typedef struct lc_store_backend lc_store_backend;
typedef struct lc_store_writer_ops lc_store_writer_ops;

struct lc_store {
    const lc_store_backend *be;
    char *url;  /* normalised URL, owned */
    void *impl; /* backend state, freed by be->close */
};

/* Backends embed this as the first member of their writer and free the whole thing in
 * commit/abort. */
struct lc_store_writer {
    const lc_store_writer_ops *ops;
};

struct lc_store_writer_ops {
    lc_rc (*write)(lc_store_writer *w, const void *buf, size_t len, lc_err *err);
    lc_rc (*commit)(lc_store_writer *w, lc_err *err); /* frees w, also on failure */
    void (*abort)(lc_store_writer *w);                /* frees w */
    void (*detach)(lc_store_writer *w); /* frees w, keeps a multipart upload; NULL: abort */
};

/* Keys reaching these functions are valid (lc_store_key_valid) and pointers are non-NULL. */
struct lc_store_backend {
    const char *scheme; /* "file://" */
    /* Fill s->url (normalised) and s->impl. */
    lc_rc (*open)(lc_store *s, const char *url, lc_err *err);
    void (*close)(lc_store *s);
    /* o is never NULL (zeroed when the caller gave none) */
    lc_rc (*put_buf)(lc_store *s, const char *key, const void *buf, size_t len,
                     const lc_store_put_opts *o, lc_err *err);
    lc_rc (*put_file)(lc_store *s, const char *key, const char *src, unsigned flags, lc_err *err);
    lc_rc (*get_file)(lc_store *s, const char *key, const char *dst, lc_err *err);
    lc_rc (*get_buf)(lc_store *s, const char *key, size_t max, void **buf, size_t *len,
                     lc_err *err);
    lc_rc (*head)(lc_store *s, const char *key, lc_store_stat *st, lc_err *err);
    lc_rc (*del)(lc_store *s, const char *key, lc_err *err);
    /* prefix is "" or passes the checks in store.c. */
    lc_rc (*list)(lc_store *s, const char *prefix, lc_store_list_fn fn, void *ctx, lc_err *err);
    /* NULL for remote backends: store.c answers LC_ERR_UNSUPPORTED. */
    lc_rc (*local_path)(lc_store *s, const char *key, char **path, lc_err *err);
    /* o is never NULL */
    lc_rc (*writer_open)(lc_store *s, const char *key, const lc_store_writer_opts *o,
                         lc_store_writer **out, lc_err *err);
    /* len is -1 (to the end) or > 0; offset >= 0 */
    lc_rc (*read)(lc_store *s, const char *key, int64_t offset, int64_t len, lc_store_read_fn fn,
                  void *ctx, lc_err *err);
    /* Optional (NULL: LC_ERR_UNSUPPORTED, a no-op for instrument, 0 for the threshold). */
    int64_t (*multipart_threshold)(const lc_store *s);
    void (*instrument)(lc_store *s, lc_metrics *m, const char *prefix, const char *label);
    lc_rc (*mpu_create)(lc_store *s, const char *key, const char *digest, char **upload_id,
                        lc_err *err);
    lc_rc (*mpu_put_part)(lc_store *s, const char *key, const char *upload_id, int number,
                          const void *buf, size_t len, lc_store_part *out, lc_err *err);
    lc_rc (*mpu_complete)(lc_store *s, const char *key, const char *upload_id,
                          const lc_store_part *parts, size_t n, lc_err *err);
    lc_rc (*mpu_abort)(lc_store *s, const char *key, const char *upload_id, lc_err *err);
    lc_rc (*mpu_list_parts)(lc_store *s, const char *key, const char *upload_id,
                            lc_store_part **parts, size_t *n, lc_err *err);
    lc_rc (*mpu_list)(lc_store *s, const char *prefix, lc_store_mpu_list_fn fn, void *ctx,
                      lc_err *err);
};

extern const lc_store_backend lc_store_file_backend;
extern const lc_store_backend lc_store_s3_backend;

/* Tests only: make the file backend walk keys component by component with O_NOFOLLOW, as it
 * does on kernels without openat2. Call before the store is shared between threads. */
void lc_store_file_force_fallback(lc_store *s);

#endif
