/*
 * store_file.c: the file:// object-store backend. Objects are regular files beneath one root
 * directory held open as an O_PATH fd; every key is resolved with openat2(RESOLVE_BENEATH), or
 * component by component with O_NOFOLLOW where openat2 is missing, so neither a key nor a
 * symbolic link planted in the store reaches outside it. Writes go to ".tmp-<16 hex>" in the
 * target directory, are fsync'd and renamed into place, so readers never see partial objects.
 * Thread-safe: the only state shared between calls is the read-only root fd and path.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "lc/util.h"
#include "store_internal.h"

#define KEY_MAX      1024
#define TMP_PREFIX   ".tmp-"
#define TMP_NAME_LEN 21 /* ".tmp-" + 16 hex digits */
#define DIR_MODE     0755
#define FILE_MODE    0644
#define COPY_CHUNK   (1 << 20)

typedef struct fstore {
    int root;        /* O_PATH | O_DIRECTORY */
    char *root_path; /* absolute, no trailing slash */
    int use_openat2; /* probed at open, read-only afterwards */
} fstore;

static fstore *fs_of(lc_store *s)
{
    return s->impl;
}

/* --- resolution beneath the root ------------------------------------------------------- */

/* Walk rel one component at a time without following symbolic links: the fallback for
 * kernels before 5.6. Keys hold no "." or ".." components, so this cannot climb out. */
static int open_walk(const fstore *fs, const char *rel, int flags, mode_t mode)
{
    char buf[KEY_MAX + 1];
    if (lc_strlcpy(buf, rel, sizeof(buf)) >= sizeof(buf)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int cur = fs->root;
    char *comp = buf;
    for (;;) {
        char *slash = strchr(comp, '/');
        if (!slash)
            break;
        *slash = '\0';
        int next = openat(cur, comp, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        int saved = errno;
        if (cur != fs->root)
            close(cur);
        if (next < 0) {
            errno = saved;
            return -1;
        }
        cur = next;
        comp = slash + 1;
    }
    int fd = openat(cur, comp, flags | O_NOFOLLOW | O_CLOEXEC, mode);
    int saved = errno;
    if (cur != fs->root)
        close(cur);
    errno = saved;
    return fd;
}

/* Open rel ("." for the root itself) beneath the root; -1 with errno on failure. EXDEV or
 * ELOOP mean the path tried to leave the store. */
static int open_beneath(const fstore *fs, const char *rel, int flags, mode_t mode)
{
    if (fs->use_openat2) {
        struct open_how how = {
            .flags = (unsigned long long)(flags | O_CLOEXEC),
            .mode = (flags & O_CREAT) ? mode : 0,
            .resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
        };
        for (int tries = 0;; tries++) {
            long fd = syscall(SYS_openat2, fs->root, rel, &how, sizeof(how));
            if (fd >= 0)
                return (int)fd;
            /* EAGAIN: a concurrent rename made the kernel unsure ".." stayed beneath */
            if ((errno == EAGAIN || errno == EINTR) && tries < 8)
                continue;
            if (errno != ENOSYS)
                return -1;
            break;
        }
    }
    if (strcmp(rel, ".") == 0)
        return openat(fs->root, ".", flags | O_CLOEXEC, mode);
    return open_walk(fs, rel, flags, mode);
}

/* --- small helpers ---------------------------------------------------------------------- */

static int is_tmp_name(const char *name)
{
    if (strncmp(name, TMP_PREFIX, strlen(TMP_PREFIX)) != 0 || strlen(name) != TMP_NAME_LEN)
        return 0;
    for (const char *p = name + strlen(TMP_PREFIX); *p; p++)
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f')))
            return 0;
    return 1;
}

static const char *leaf_of(const char *key)
{
    const char *slash = strrchr(key, '/');
    return slash ? slash + 1 : key;
}

/* The directory part of key ("." when key has none) into dir (KEY_MAX + 1 bytes). */
static void dir_of(const char *key, char *dir)
{
    const char *slash = strrchr(key, '/');
    if (!slash) {
        strcpy(dir, ".");
        return;
    }
    memcpy(dir, key, (size_t)(slash - key));
    dir[slash - key] = '\0';
}

static lc_rc reserved_key(lc_err *err, const char *key)
{
    return lc_err_set(err, LC_ERR_INVALID,
                      "invalid object key \"%s\": the name is reserved for temporary files", key);
}

/* Map errno after a failed call on key; writing picks the codes that fit a write. */
static lc_rc sys_fail(lc_err *err, int e, const char *what, const char *key, int writing)
{
    lc_rc rc = LC_ERR_IO;
    switch (e) {
    case EXDEV:
    case ELOOP:
        return lc_err_set(err, LC_ERR_INVALID,
                          "could not %s object \"%s\": key resolves outside the store or through "
                          "a symbolic link",
                          what, key);
    case ENOENT:
        rc = writing ? LC_ERR_IO : LC_ERR_NOT_FOUND;
        break;
    case ENOTDIR:
    case EEXIST:
    case EISDIR:
    case ENOTEMPTY:
        if (writing)
            return lc_err_set(err, LC_ERR_EXISTS,
                              "could not %s object \"%s\": a file or directory in the way has "
                              "the same name as a component of the key",
                              what, key);
        rc = LC_ERR_NOT_FOUND;
        break;
    case ENOMEM:
        rc = LC_ERR_NOMEM;
        break;
    case ENAMETOOLONG:
        rc = LC_ERR_INVALID;
        break;
    default:
        break;
    }
    return lc_err_set(err, rc, "could not %s object \"%s\": %s", what, key, strerror(e));
}

static int write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len > (1u << 30) ? (1u << 30) : len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Copy in to out from their current offsets; copy_file_range first (reflinks, no user-space
 * copy), read/write where the file systems do not support it. */
static int copy_fd(int in, int out)
{
    int use_cfr = 1;
    char *buf = NULL;
    for (;;) {
        if (use_cfr) {
            ssize_t n = copy_file_range(in, NULL, out, NULL, 1u << 30, 0);
            if (n > 0)
                continue;
            if (n == 0)
                return 0;
            if (errno == EINTR)
                continue;
            if (errno != EXDEV && errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP &&
                errno != EBADF)
                return -1;
            use_cfr = 0;
            buf = malloc(COPY_CHUNK);
            if (!buf) {
                errno = ENOMEM;
                return -1;
            }
        }
        ssize_t n = read(in, buf, COPY_CHUNK);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0 || write_all(out, buf, (size_t)n) != 0) {
            int saved = errno;
            free(buf);
            errno = saved;
            return n == 0 ? 0 : -1;
        }
    }
}

/* Create a fresh temporary file in dirfd; name gets TMP_NAME_LEN + 1 bytes. */
static int tmp_create(int dirfd, char *name)
{
    static const char hex[] = "0123456789abcdef";
    for (int tries = 0; tries < 16; tries++) {
        unsigned char r[8];
        if (lc_random_bytes(r, sizeof(r)) != LC_OK)
            return -1;
        memcpy(name, TMP_PREFIX, strlen(TMP_PREFIX));
        char *p = name + strlen(TMP_PREFIX);
        for (size_t i = 0; i < sizeof(r); i++) {
            *p++ = hex[r[i] >> 4];
            *p++ = hex[r[i] & 15];
        }
        *p = '\0';
        int fd =
            openat(dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, FILE_MODE);
        if (fd >= 0 || errno != EEXIST)
            return fd;
    }
    errno = EEXIST;
    return -1;
}

/* Create every missing directory of dir (a valid key) beneath the root, each in a directory
 * already resolved beneath it, fsyncing the parent of each new one so the entry is durable. */
static int mkdirs_beneath(const fstore *fs, const char *dir)
{
    char parent[KEY_MAX + 1];
    const char *comp = dir;
    for (;;) {
        const char *slash = strchr(comp, '/');
        size_t plen = (size_t)(comp - dir);
        if (plen == 0) {
            strcpy(parent, ".");
        } else {
            memcpy(parent, dir, plen - 1);
            parent[plen - 1] = '\0';
        }
        char name[KEY_MAX + 1];
        size_t nlen = slash ? (size_t)(slash - comp) : strlen(comp);
        memcpy(name, comp, nlen);
        name[nlen] = '\0';
        int pfd = open_beneath(fs, parent, O_RDONLY | O_DIRECTORY, 0);
        if (pfd < 0)
            return -1;
        int r = mkdirat(pfd, name, DIR_MODE);
        if (r == 0)
            r = fsync(pfd);
        else if (errno == EEXIST)
            r = 0;
        int saved = errno;
        close(pfd);
        if (r != 0) {
            errno = saved;
            return -1;
        }
        if (!slash)
            return 0;
        comp = slash + 1;
    }
}

/* Open the directory that holds key (readable, so it can be fsync'd), creating it when
 * create is set. */
static int open_parent(const fstore *fs, const char *key, int create)
{
    char dir[KEY_MAX + 1];
    dir_of(key, dir);
    int fd = open_beneath(fs, dir, O_RDONLY | O_DIRECTORY, 0);
    if (fd >= 0 || !create || errno != ENOENT)
        return fd;
    if (mkdirs_beneath(fs, dir) != 0)
        return -1;
    return open_beneath(fs, dir, O_RDONLY | O_DIRECTORY, 0);
}

/* fsync fd, close it, rename tmp to leaf in dirfd, fsync dirfd (unless dirsync is 0: a later
 * fsync of dirfd's directory makes the entry durable). Closes fd in every case and removes tmp
 * on failure. */
static int publish(int dirfd, int fd, const char *tmp, const char *leaf, int dirsync)
{
    int r = fsync(fd);
    int saved = errno;
    if (close(fd) != 0 && r == 0) {
        r = -1;
        saved = errno;
    }
    if (r == 0 && renameat(dirfd, tmp, dirfd, leaf) != 0) {
        r = -1;
        saved = errno;
    }
    if (r != 0) {
        unlinkat(dirfd, tmp, 0);
        errno = saved;
        return -1;
    }
    /* the object is in place; a failed directory fsync only weakens durability, so report it
     * but the rename stands */
    return dirsync ? fsync(dirfd) : 0;
}

/* Open an existing object for reading (O_RDONLY) or inspection (O_PATH); fails with ENOENT
 * when key names something other than a regular file. */
static int open_object(const fstore *fs, const char *key, int flags, struct stat *st)
{
    int fd = open_beneath(fs, key, flags, 0);
    if (fd < 0)
        return -1;
    int ok = fstat(fd, st) == 0;
    if (!ok || !S_ISREG(st->st_mode)) {
        int saved = ok ? ENOENT : errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

/* --- open / close ----------------------------------------------------------------------- */

static lc_rc file_open(lc_store *s, const char *url, lc_err *err)
{
    lc_rc rc = LC_OK;
    char *abs = NULL;
    fstore *fs = NULL;
    const char *path = lc_file_url_path(url);
    if (!path || !*path)
        return lc_err_set(err, LC_ERR_CONFIG, "object store URL \"%s\" has no directory", url);
    rc = lc_mkdirs(path, DIR_MODE, err);
    if (rc != LC_OK) {
        lc_err_wrap(err, "could not open object store");
        return rc;
    }
    abs = realpath(path, NULL);
    if (!abs)
        return lc_err_set(err, LC_ERR_IO, "could not resolve object store directory \"%s\": %s",
                          path, strerror(errno));
    fs = calloc(1, sizeof(*fs));
    if (fs)
        fs->root = -1;
    if (!fs || asprintf(&s->url, "file://%s", abs) < 0) {
        s->url = NULL;
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory opening object store");
        goto out;
    }
    fs->root = open(abs, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fs->root < 0) {
        rc = lc_err_set(err, LC_ERR_IO, "could not open object store directory \"%s\": %s", abs,
                        strerror(errno));
        goto out;
    }
    /* ENOSYS on old kernels, EPERM under seccomp profiles that predate openat2 */
    struct open_how how = {.flags = O_PATH | O_DIRECTORY | O_CLOEXEC,
                           .resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS};
    long probe = syscall(SYS_openat2, fs->root, ".", &how, sizeof(how));
    fs->use_openat2 = probe >= 0;
    if (probe >= 0)
        close((int)probe);
    fs->root_path = abs;
    abs = NULL;
    s->impl = fs;
    fs = NULL;
out:
    if (fs && fs->root >= 0)
        close(fs->root);
    free(fs);
    free(abs);
    return rc;
}

static void file_close(lc_store *s)
{
    fstore *fs = fs_of(s);
    if (!fs)
        return;
    close(fs->root);
    free(fs->root_path);
    free(fs);
}

void lc_store_file_force_fallback(lc_store *s)
{
    if (s && s->be == &lc_store_file_backend)
        fs_of(s)->use_openat2 = 0;
}

/* --- writes ----------------------------------------------------------------------------- */

static lc_rc file_put_buf(lc_store *s, const char *key, const void *buf, size_t len,
                          const lc_store_put_opts *o, lc_err *err)
{
    (void)o; /* files keep no digest */
    const fstore *fs = fs_of(s);
    char tmp[TMP_NAME_LEN + 1];
    if (is_tmp_name(leaf_of(key)))
        return reserved_key(err, key);
    int dirfd = open_parent(fs, key, 1);
    if (dirfd < 0)
        return sys_fail(err, errno, "write", key, 1);
    lc_rc rc = LC_OK;
    int fd = tmp_create(dirfd, tmp);
    if (fd < 0) {
        rc = sys_fail(err, errno, "write", key, 1);
        goto out;
    }
    if (write_all(fd, buf, len) != 0) {
        rc = sys_fail(err, errno, "write", key, 1);
        close(fd);
        unlinkat(dirfd, tmp, 0);
        goto out;
    }
    if (publish(dirfd, fd, tmp, leaf_of(key), 1) != 0)
        rc = sys_fail(err, errno, "write", key, 1);
out:
    close(dirfd);
    return rc;
}

/* Copy from the open source fd into a temporary file, then publish it. */
static lc_rc put_copy(int dirfd, const char *key, int src, int dirsync, lc_err *err)
{
    char tmp[TMP_NAME_LEN + 1];
    int fd = tmp_create(dirfd, tmp);
    if (fd < 0)
        return sys_fail(err, errno, "write", key, 1);
    if (copy_fd(src, fd) != 0) {
        lc_rc rc = sys_fail(err, errno, "write", key, 1);
        close(fd);
        unlinkat(dirfd, tmp, 0);
        return rc;
    }
    if (publish(dirfd, fd, tmp, leaf_of(key), dirsync) != 0)
        return sys_fail(err, errno, "write", key, 1);
    return LC_OK;
}

static lc_rc file_put_file(lc_store *s, const char *key, const char *src_path, unsigned flags,
                           lc_err *err)
{
    const fstore *fs = fs_of(s);
    lc_rc rc = LC_OK;
    int dirfd = -1;
    struct stat st;
    if (is_tmp_name(leaf_of(key)))
        return reserved_key(err, key);
    int move = (flags & LC_STORE_MOVE) != 0;
    const int dirsync = (flags & LC_STORE_DEFER_DIRSYNC) == 0;
    /* a moved symlink would be stored as a link: only move plain files */
    int src = open(src_path, O_RDONLY | O_CLOEXEC | (move ? O_NOFOLLOW : 0));
    if (src < 0 && move && errno == ELOOP) {
        move = 0;
        src = open(src_path, O_RDONLY | O_CLOEXEC);
    }
    if (src < 0)
        return lc_err_set(err, errno == ENOENT ? LC_ERR_NOT_FOUND : LC_ERR_IO,
                          "could not open \"%s\": %s", src_path, strerror(errno));
    if (fstat(src, &st) != 0 || !S_ISREG(st.st_mode)) {
        rc =
            lc_err_set(err, LC_ERR_INVALID, "could not store \"%s\": not a regular file", src_path);
        goto out;
    }
    dirfd = open_parent(fs, key, 1);
    if (dirfd < 0) {
        rc = sys_fail(err, errno, "write", key, 1);
        goto out;
    }
    /* another hard link would let the stored object change: copy such files */
    if (move && st.st_nlink == 1) {
        if (!(flags & LC_STORE_SRC_SYNCED) && fsync(src) != 0) {
            rc = lc_err_set(err, LC_ERR_IO, "could not sync \"%s\": %s", src_path, strerror(errno));
            goto out;
        }
        if (renameat(AT_FDCWD, src_path, dirfd, leaf_of(key)) == 0) {
            if (dirsync && fsync(dirfd) != 0)
                rc = sys_fail(err, errno, "write", key, 1);
            goto out;
        }
        if (errno != EXDEV) {
            rc = sys_fail(err, errno, "write", key, 1);
            goto out;
        }
    }
    rc = put_copy(dirfd, key, src, dirsync, err);
    if (rc == LC_OK && move && unlink(src_path) != 0 && errno != ENOENT)
        rc = lc_err_set(err, LC_ERR_IO, "stored object \"%s\" but could not remove \"%s\": %s", key,
                        src_path, strerror(errno));
out:
    if (dirfd >= 0)
        close(dirfd);
    close(src);
    return rc;
}

/* --- reads ------------------------------------------------------------------------------ */

static lc_rc file_get_file(lc_store *s, const char *key, const char *dst_path, lc_err *err)
{
    const fstore *fs = fs_of(s);
    lc_rc rc = LC_OK;
    int dfd = -1, tfd = -1;
    char tmp[TMP_NAME_LEN + 1];
    char dir[PATH_MAX];
    struct stat st;
    if (is_tmp_name(leaf_of(key)))
        return reserved_key(err, key);
    int src = open_object(fs, key, O_RDONLY, &st);
    if (src < 0)
        return sys_fail(err, errno, "read", key, 0);
    const char *slash = strrchr(dst_path, '/');
    const char *base = slash ? slash + 1 : dst_path;
    size_t dlen = slash ? (size_t)(slash - dst_path) : 0;
    if (!*base || dlen >= sizeof(dir)) {
        rc = lc_err_set(err, LC_ERR_INVALID, "invalid destination file \"%s\"", dst_path);
        goto out;
    }
    if (!slash)
        strcpy(dir, ".");
    else if (dlen == 0)
        strcpy(dir, "/");
    else {
        memcpy(dir, dst_path, dlen);
        dir[dlen] = '\0';
    }
    dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0 || (tfd = tmp_create(dfd, tmp)) < 0) {
        rc = lc_err_set(err, errno == ENOENT ? LC_ERR_NOT_FOUND : LC_ERR_IO,
                        "could not create \"%s\": %s", dst_path, strerror(errno));
        goto out;
    }
    if (copy_fd(src, tfd) != 0) {
        rc = lc_err_set(err, LC_ERR_IO, "could not copy object \"%s\" to \"%s\": %s", key, dst_path,
                        strerror(errno));
        close(tfd);
        unlinkat(dfd, tmp, 0);
        goto out;
    }
    if (publish(dfd, tfd, tmp, base, 1) != 0)
        rc = lc_err_set(err, LC_ERR_IO, "could not write \"%s\": %s", dst_path, strerror(errno));
out:
    if (dfd >= 0)
        close(dfd);
    close(src);
    return rc;
}

static lc_rc file_get_buf(lc_store *s, const char *key, size_t max, void **out, size_t *len,
                          lc_err *err)
{
    const fstore *fs = fs_of(s);
    lc_rc rc = LC_OK;
    struct stat st;
    char *buf = NULL;
    if (is_tmp_name(leaf_of(key)))
        return reserved_key(err, key);
    int fd = open_object(fs, key, O_RDONLY, &st);
    if (fd < 0)
        return sys_fail(err, errno, "read", key, 0);
    if ((uint64_t)st.st_size > (uint64_t)max) {
        rc = lc_err_set(err, LC_ERR_TOO_LARGE, "object \"%s\" is larger than %zu bytes", key, max);
        goto out;
    }
    /* objects are replaced, never changed in place, so st_size holds; read one byte more to
     * notice a file someone rewrote in place anyway */
    size_t cap = (size_t)st.st_size + 2, n = 0;
    buf = malloc(cap);
    if (!buf) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory reading object \"%s\"", key);
        goto out;
    }
    for (;;) {
        ssize_t r = read(fd, buf + n, cap - 1 - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            rc = sys_fail(err, errno, "read", key, 0);
            goto out;
        }
        if (r == 0)
            break;
        n += (size_t)r;
        if (n > max || n == cap - 1) {
            rc = lc_err_set(err, n > max ? LC_ERR_TOO_LARGE : LC_ERR_CONFLICT,
                            "object \"%s\" changed while it was read", key);
            goto out;
        }
    }
    buf[n] = '\0';
    *out = buf;
    *len = n;
    buf = NULL;
out:
    free(buf);
    close(fd);
    return rc;
}

static lc_rc file_head(lc_store *s, const char *key, lc_store_stat *out, lc_err *err)
{
    struct stat st;
    if (is_tmp_name(leaf_of(key)))
        return reserved_key(err, key);
    int fd = open_object(fs_of(s), key, O_PATH, &st);
    if (fd < 0)
        return sys_fail(err, errno, "stat", key, 0);
    close(fd);
    out->size = (int64_t)st.st_size;
    out->mtime_ms = (int64_t)st.st_mtim.tv_sec * 1000 + st.st_mtim.tv_nsec / 1000000;
    return LC_OK;
}

static lc_rc file_delete(lc_store *s, const char *key, lc_err *err)
{
    if (is_tmp_name(leaf_of(key)))
        return reserved_key(err, key);
    int dirfd = open_parent(fs_of(s), key, 0);
    if (dirfd < 0)
        return errno == ENOENT || errno == ENOTDIR ? LC_OK : sys_fail(err, errno, "delete", key, 0);
    /* a directory at key is a prefix of other objects, not an object: nothing to delete */
    int r = unlinkat(dirfd, leaf_of(key), 0);
    int saved = errno;
    close(dirfd);
    if (r != 0 && saved != ENOENT && saved != EISDIR)
        return sys_fail(err, saved, "delete", key, 0);
    return LC_OK;
}

static lc_rc file_local_path(lc_store *s, const char *key, char **path, lc_err *err)
{
    const fstore *fs = fs_of(s);
    struct stat st;
    if (is_tmp_name(leaf_of(key)))
        return reserved_key(err, key);
    /* only hand out paths that resolve beneath the root, to an existing object */
    int fd = open_object(fs, key, O_PATH, &st);
    if (fd < 0)
        return sys_fail(err, errno, "locate", key, 0);
    close(fd);
    if (asprintf(path, "%s/%s", fs->root_path, key) < 0) {
        *path = NULL;
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory locating object \"%s\"", key);
    }
    return LC_OK;
}

/* --- listing ---------------------------------------------------------------------------- */

typedef struct walk {
    lc_store_list_fn fn;
    void *ctx;
    const char *prefix;
    size_t plen;
    int stopped;
    lc_err *err;
    char key[KEY_MAX + 2];
} walk;

/* List the directory dfd (consumed) whose key, with a trailing '/', is key[0..klen). */
static lc_rc walk_dir(walk *w, int dfd, size_t klen)
{
    lc_rc rc = LC_OK;
    DIR *d = fdopendir(dfd);
    if (!d) {
        close(dfd);
        return lc_err_set(w->err, LC_ERR_IO, "could not list objects under \"%.*s\": %s", (int)klen,
                          w->key, strerror(errno));
    }
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(d);
        if (!de) {
            if (errno != 0)
                rc = lc_err_set(w->err, LC_ERR_IO, "could not list objects under \"%.*s\": %s",
                                (int)klen, w->key, strerror(errno));
            break;
        }
        const char *name = de->d_name;
        size_t nlen = strlen(name);
        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0 || klen + nlen >= KEY_MAX)
            continue;
        memcpy(w->key + klen, name, nlen + 1);
        size_t kl = klen + nlen;
        struct stat st;
        int type = de->d_type;
        if (type == DT_UNKNOWN) {
            if (fstatat(dirfd(d), name, &st, AT_SYMLINK_NOFOLLOW) != 0)
                continue;
            type = S_ISDIR(st.st_mode) ? DT_DIR : S_ISREG(st.st_mode) ? DT_REG : DT_LNK;
        }
        if (type == DT_DIR) {
            /* descend only where the prefix and this directory's key can still agree */
            w->key[kl] = '/';
            w->key[kl + 1] = '\0';
            size_t cmp = kl + 1 < w->plen ? kl + 1 : w->plen;
            if (memcmp(w->key, w->prefix, cmp) != 0)
                continue;
            int cfd = openat(dirfd(d), name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (cfd < 0) {
                if (errno == ENOENT)
                    continue; /* removed while we listed */
                rc = lc_err_set(w->err, LC_ERR_IO, "could not list objects under \"%s\": %s",
                                w->key, strerror(errno));
                break;
            }
            rc = walk_dir(w, cfd, kl + 1);
            if (rc != LC_OK || w->stopped)
                break;
        } else if (type == DT_REG) {
            /* symbolic links are never listed: listing must not leave the root */
            if (is_tmp_name(name) || kl < w->plen || memcmp(w->key, w->prefix, w->plen) != 0 ||
                !lc_store_key_valid(w->key))
                continue;
            if (fstatat(dirfd(d), name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode))
                continue;
            lc_store_stat sst = {
                .size = (int64_t)st.st_size,
                .mtime_ms = (int64_t)st.st_mtim.tv_sec * 1000 + st.st_mtim.tv_nsec / 1000000,
            };
            if (w->fn(w->ctx, w->key, &sst) != 0) {
                w->stopped = 1;
                break;
            }
        }
    }
    closedir(d);
    return rc;
}

static lc_rc file_list(lc_store *s, const char *prefix, lc_store_list_fn fn, void *ctx, lc_err *err)
{
    walk *w = calloc(1, sizeof(*w));
    if (!w)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory listing objects");
    w->fn = fn;
    w->ctx = ctx;
    w->prefix = prefix;
    w->plen = strlen(prefix);
    w->err = err;
    char dir[KEY_MAX + 1];
    dir_of(prefix, dir);
    size_t klen = 0;
    if (strcmp(dir, ".") != 0) {
        klen = strlen(dir) + 1;
        memcpy(w->key, prefix, klen);
    }
    lc_rc rc = LC_OK;
    int dfd = open_beneath(fs_of(s), dir, O_RDONLY | O_DIRECTORY, 0);
    if (dfd < 0) {
        if (errno != ENOENT && errno != ENOTDIR)
            rc = sys_fail(err, errno, "list", prefix, 0);
    } else {
        rc = walk_dir(w, dfd, klen);
    }
    free(w);
    return rc;
}

/* --- streaming writer ------------------------------------------------------------------- */

typedef struct fwriter {
    lc_store_writer base;
    int dirfd, fd;
    char tmp[TMP_NAME_LEN + 1];
    char *key;
    int failed; /* a write failed: the temporary file may hold a partial object */
} fwriter;

static void fwriter_free(fwriter *w)
{
    if (w->fd >= 0) {
        close(w->fd);
        unlinkat(w->dirfd, w->tmp, 0);
    }
    if (w->dirfd >= 0)
        close(w->dirfd);
    free(w->key);
    free(w);
}

static lc_rc fwriter_write(lc_store_writer *base, const void *buf, size_t len, lc_err *err)
{
    fwriter *w = (fwriter *)base;
    if (w->failed)
        return lc_err_set(err, LC_ERR_INVALID, "writer for object \"%s\" failed earlier", w->key);
    if (write_all(w->fd, buf, len) != 0) {
        w->failed = 1;
        return sys_fail(err, errno, "write", w->key, 1);
    }
    return LC_OK;
}

static lc_rc fwriter_commit(lc_store_writer *base, lc_err *err)
{
    fwriter *w = (fwriter *)base;
    lc_rc rc = LC_OK;
    if (w->failed) {
        rc = lc_err_set(err, LC_ERR_INVALID,
                        "could not commit object \"%s\": an earlier write failed", w->key);
        fwriter_free(w);
        return rc;
    }
    int fd = w->fd;
    w->fd = -1; /* publish closes it and removes the temporary file on failure */
    if (publish(w->dirfd, fd, w->tmp, leaf_of(w->key), 1) != 0)
        rc = sys_fail(err, errno, "write", w->key, 1);
    fwriter_free(w);
    return rc;
}

static void fwriter_abort(lc_store_writer *base)
{
    fwriter_free((fwriter *)base);
}

static const lc_store_writer_ops fwriter_ops = {
    .write = fwriter_write,
    .commit = fwriter_commit,
    .abort = fwriter_abort,
};

static lc_rc file_writer_open(lc_store *s, const char *key, const lc_store_writer_opts *o,
                              lc_store_writer **out, lc_err *err)
{
    (void)o; /* no parts, no digest: a temporary file renamed at commit */
    if (is_tmp_name(leaf_of(key)))
        return reserved_key(err, key);
    fwriter *w = calloc(1, sizeof(*w));
    if (!w || !(w->key = strdup(key))) {
        free(w);
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory opening object \"%s\"", key);
    }
    w->base.ops = &fwriter_ops;
    w->fd = -1;
    w->dirfd = open_parent(fs_of(s), key, 1);
    lc_rc rc = LC_OK;
    if (w->dirfd < 0 || (w->fd = tmp_create(w->dirfd, w->tmp)) < 0) {
        rc = sys_fail(err, errno, "write", key, 1);
        fwriter_free(w);
        return rc;
    }
    *out = &w->base;
    return LC_OK;
}

/* --- ranged reads ------------------------------------------------------------------------ */

static lc_rc file_read(lc_store *s, const char *key, int64_t offset, int64_t len,
                       lc_store_read_fn fn, void *ctx, lc_err *err)
{
    struct stat st;
    lc_rc rc = LC_OK;
    char *buf = NULL;
    if (is_tmp_name(leaf_of(key)))
        return reserved_key(err, key);
    int fd = open_object(fs_of(s), key, O_RDONLY, &st);
    if (fd < 0)
        return sys_fail(err, errno, "read", key, 0);
    if (!(buf = malloc(COPY_CHUNK))) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory reading object \"%s\"", key);
        goto out;
    }
    int64_t left = len < 0 ? INT64_MAX : len;
    while (left > 0) {
        ssize_t n = pread(fd, buf, left < COPY_CHUNK ? (size_t)left : COPY_CHUNK, (off_t)offset);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = sys_fail(err, errno, "read", key, 0);
            goto out;
        }
        if (n == 0)
            break;
        if (fn(ctx, buf, (size_t)n) != 0) {
            rc = lc_err_set(err, LC_ERR_CANCELLED, "reading object \"%s\" was stopped", key);
            goto out;
        }
        offset += n;
        left -= n;
    }
out:
    free(buf);
    close(fd);
    return rc;
}

const lc_store_backend lc_store_file_backend = {
    .scheme = "file://",
    .open = file_open,
    .close = file_close,
    .put_buf = file_put_buf,
    .put_file = file_put_file,
    .get_file = file_get_file,
    .get_buf = file_get_buf,
    .head = file_head,
    .del = file_delete,
    .list = file_list,
    .local_path = file_local_path,
    .writer_open = file_writer_open,
    .read = file_read,
};
