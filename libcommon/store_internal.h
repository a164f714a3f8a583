/*
 * store_internal.h: the backend interface behind lc_store (store.c checks arguments and keys,
 * then dispatches here). One backend per URL scheme: file:// in store_file.c, s3:// later.
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
};

/* Keys reaching these functions are valid (lc_store_key_valid) and pointers are non-NULL. */
struct lc_store_backend {
    const char *scheme; /* "file://" */
    /* Fill s->url (normalised) and s->impl. */
    lc_rc (*open)(lc_store *s, const char *url, lc_err *err);
    void (*close)(lc_store *s);
    lc_rc (*put_buf)(lc_store *s, const char *key, const void *buf, size_t len, lc_err *err);
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
    lc_rc (*writer_open)(lc_store *s, const char *key, lc_store_writer **out, lc_err *err);
};

extern const lc_store_backend lc_store_file_backend;

/* Tests only: make the file backend walk keys component by component with O_NOFOLLOW, as it
 * does on kernels without openat2. Call before the store is shared between threads. */
void lc_store_file_force_fallback(lc_store *s);

#endif
