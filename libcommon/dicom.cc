/*
 * dicom.cc: lc_dicom_* (lc/dicom.h): the header fill, the C entry points and pixel decoding.
 * Every input is first walked and checked (dicom_walk.cc), which records the element tree;
 * header values and the DICOM JSON (dicom_json.cc) are read straight from that tree, so the
 * common case never builds a GDCM data set. GDCM 3 decodes pixels, from the same checked
 * bytes: Debian's GDCM 3.0.21 keeps assert() and trusts lengths and codestreams, so what it
 * reads is checked here first (the walk, *_ok). Results are malloc'd and owned by the caller.
 * Reentrant: each call has its own state; shared are only read-only tables and GDCM's trace
 * switches, set once. No C++ exception crosses the C boundary: every entry point catches all.
 */
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <istream>
#include <mutex>
#include <new>
#include <set>
#include <streambuf>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

/* GDCM's headers trip -Wdeprecated-copy under clang's -Wextra: not ours to fix */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-copy"
#ifdef __clang__
#pragma clang diagnostic ignored "-Wdeprecated-copy-with-user-provided-copy"
#endif
#include "gdcmBitmap.h"
#include "gdcmDataSet.h"
#include "gdcmExplicitDataElement.h"
#include "gdcmFragment.h"
#include "gdcmImplicitDataElement.h"
#include "gdcmItem.h"
#include "gdcmSequenceOfFragments.h"
#include "gdcmSequenceOfItems.h"
#include "gdcmSwapper.h"
#include "gdcmTrace.h"
#include "gdcmTransferSyntax.h"
#pragma GCC diagnostic pop

#include "dicom_internal.h"

extern "C" {
#include "lc/dicom.h"
#include "lc/rc.h"
#include "lc/util.h"
}

using lcdcm::Charset;
using lcdcm::Enc;
using lcdcm::Input;
using lcdcm::N_ITEM;
using lcdcm::N_SEQ;
using lcdcm::N_VALUE;
using lcdcm::Node;
using lcdcm::Scan;
using lcdcm::strf;
using lcdcm::Tree;
using lcdcm::vr2;

namespace
{

/* ---- GDCM set-up ------------------------------------------------------------------------- */

/* GDCM writes its own warnings to stderr; radpipe reports through lc_err instead. */
void gdcm_quiet()
{
    static std::once_flag once;
    std::call_once(once, [] {
        gdcm::Trace::SetDebug(false);
        gdcm::Trace::SetWarning(false);
        gdcm::Trace::SetError(false);
    });
}

/* A read-only, seekable streambuf over memory: GDCM reads without a copy. */
class MemBuf : public std::streambuf
{
  public:
    MemBuf(const void *p, size_t n)
    {
        char *b = const_cast<char *>(static_cast<const char *>(p)); /* never written */
        setg(b, b, b + n);
    }

  protected:
    pos_type seekoff(off_type off, std::ios_base::seekdir dir,
                     std::ios_base::openmode which) override
    {
        if (!(which & std::ios_base::in))
            return pos_type(off_type(-1));
        off_type base = dir == std::ios_base::beg   ? 0
                        : dir == std::ios_base::cur ? off_type(gptr() - eback())
                                                    : off_type(egptr() - eback());
        off_type pos = base + off;
        if (pos < 0 || pos > off_type(egptr() - eback()))
            return pos_type(off_type(-1));
        setg(eback(), eback() + pos, egptr());
        return pos_type(pos);
    }
    pos_type seekpos(pos_type pos, std::ios_base::openmode which) override
    {
        return seekoff(off_type(pos), std::ios_base::beg, which);
    }
};

/* ---- value access over the checked tree -------------------------------------------------- */

/* The top-level elements the header needs, found in one pass (the first of a repeated tag
 * wins, as in GDCM's data set). Sorted: looked up by binary search. */
const uint32_t kWanted[] = {
    0x00080005, 0x00080016, 0x00080018, 0x00080020, 0x00080021, 0x00080023, 0x00080030,
    0x00080031, 0x00080033, 0x00080050, 0x00080060, 0x00080080, 0x00080090, 0x00080201,
    0x00081030, 0x0008103E, 0x00100010, 0x00100020, 0x00100021, 0x00100030, 0x00100040,
    0x00180015, 0x00180050, 0x0020000D, 0x0020000E, 0x00200010, 0x00200011, 0x00200013,
    0x00200032, 0x00200037, 0x00200105, 0x00201002, 0x00280002, 0x00280004, 0x00280008,
    0x00280010, 0x00280011, 0x00280030, 0x00280100, 0x00280101, 0x00280102, 0x00280103,
    0x00281052, 0x00281053, 0x00400244, 0x00400245, 0x00400275, 0x52009229, 0x52009230,
};
const size_t kNWanted = sizeof(kWanted) / sizeof(kWanted[0]);

/* Per-parse state of value access: the tree, the top-level elements by kWanted index, the
 * character set, a scratch string. */
struct Ctx {
    const Tree &t;
    const Node *top[kNWanted];
    Charset cs;
    std::string tmp;
    explicit Ctx(const Tree &tree) : t(tree), top()
    {
        lcdcm::each_child(t, SIZE_MAX, [this](size_t i) {
            const uint32_t tag = t.nodes[i].tag;
            const uint32_t *w = std::lower_bound(kWanted, kWanted + kNWanted, tag);
            if (w != kWanted + kNWanted && *w == tag && !top[w - kWanted])
                top[w - kWanted] = &t.nodes[i];
        });
    }
    const Node *find(uint32_t tag) const
    {
        const uint32_t *w = std::lower_bound(kWanted, kWanted + kNWanted, tag);
        return w != kWanted + kNWanted && *w == tag ? top[w - kWanted] : nullptr;
    }
};

/* The first child of node parent with tag (parent: a data set node, i.e. an item). */
const Node *find_child(const Tree &t, const Node *parent, uint32_t tag)
{
    const Node *hit = nullptr;
    lcdcm::each_child(t, size_t(parent - t.nodes.data()), [&](size_t i) {
        if (!hit && t.nodes[i].tag == tag)
            hit = &t.nodes[i];
    });
    return hit;
}

/* The first item of sequence node sq, or nullptr. */
const Node *first_item(const Tree &t, const Node *sq)
{
    if (!sq || sq->kind != N_SEQ || sq->end <= size_t(sq - t.nodes.data()) + 1)
        return nullptr;
    const Node *it = sq + 1;
    return it->kind == N_ITEM ? it : nullptr;
}

/* The raw bytes of an element's value; false when absent, a sequence or empty. */
bool raw_value(const Tree &t, const Node *n, const char **p, size_t *len)
{
    if (!n || n->kind != N_VALUE || n->len == 0)
        return false;
    *p = reinterpret_cast<const char *>(t.base + n->off);
    *len = n->len;
    return true;
}

/* Strip DICOM padding: trailing spaces and NULs, leading spaces. (Leading spaces are significant
 * only in ST, LT and UT, which the header does not carry.) */
void trim(const char **p, size_t *n)
{
    while (*n > 0 && ((*p)[*n - 1] == ' ' || (*p)[*n - 1] == '\0'))
        (*n)--;
    while (*n > 0 && **p == ' ')
        (*p)++, (*n)--;
}

/* Parse a decimal integer string (IS, or a string-encoded US); false if malformed. */
bool parse_int(const char *p, size_t n, long lo, long hi, long *out)
{
    trim(&p, &n);
    if (n == 0 || n > 31)
        return false;
    char buf[32];
    memcpy(buf, p, n);
    buf[n] = '\0';
    char *end = nullptr;
    errno = 0;
    long v = strtol(buf, &end, 10);
    if (errno != 0 || end == buf || *end != '\0' || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

/* Parse exactly count backslash-separated DS values; false if the count or a value is bad. */
bool parse_ds(const char *p, size_t n, double *out, int count)
{
    int k = 0;
    size_t i = 0;
    while (true) {
        size_t j = i;
        while (j < n && p[j] != '\\')
            j++;
        const char *s = p + i;
        size_t len = j - i;
        trim(&s, &len);
        if (k >= count || len == 0 || len > 63)
            return false;
        char buf[64];
        memcpy(buf, s, len);
        buf[len] = '\0';
        char *end = nullptr;
        double v = strtod(buf, &end);
        if (end == buf || *end != '\0' || !std::isfinite(v))
            return false;
        out[k++] = v;
        if (j >= n)
            break;
        i = j + 1;
    }
    return k == count;
}

bool ascii_vr(uint16_t vr)
{
    static const char vrs[] = "AEASCSDADSDTISLOLTPNSHSTTMUCUIURUT";
    for (size_t i = 0; i + 1 < sizeof(vrs); i += 2)
        if (vr == vr2(vrs[i], vrs[i + 1]))
            return true;
    return false;
}

/* An unsigned short: binary (in the data set's byte order; an implicit data set and the UN
 * content inside one are little endian), or text when the element's explicit VR is a string. */
bool get_us(const Tree &t, const Node *n, int *out)
{
    const char *p;
    size_t len;
    if (!raw_value(t, n, &p, &len))
        return false;
    if (n->vr != 0 && ascii_vr(n->vr)) {
        long v;
        if (!parse_int(p, len, 0, 65535, &v))
            return false;
        *out = int(v);
        return true;
    }
    if (len < 2)
        return false;
    const unsigned char b0 = (unsigned char)p[0], b1 = (unsigned char)p[1];
    *out = t.big && !(n->flags & lcdcm::N_IMPLICIT) ? (b0 << 8) | b1 : (b1 << 8) | b0;
    return true;
}

bool get_is(const Tree &t, const Node *n, int *out)
{
    const char *p;
    size_t len;
    long v;
    if (!raw_value(t, n, &p, &len) || !parse_int(p, len, -2147483647L, 2147483647L, &v))
        return false;
    *out = int(v);
    return true;
}

bool get_ds(const Tree &t, const Node *n, double *out, int count)
{
    const char *p;
    size_t len;
    if (!raw_value(t, n, &p, &len))
        return false;
    double tmp[6];
    if (!parse_ds(p, len, tmp, count))
        return false;
    memcpy(out, tmp, sizeof(double) * size_t(count));
    return true;
}

/* How a string value is decoded: ASCII VRs (UI, CS, DA, TM) get the default repertoire, text
 * VRs (LO, SH) the Specific Character Set, PN also its component delimiters. */
enum StrKind { K_ASCII, K_TEXT, K_PN };

char *dup_str(const char *p, size_t n, bool *oom)
{
    char *s = (char *)malloc(n + 1);
    if (!s) {
        *oom = true;
        return nullptr;
    }
    memcpy(s, p, n);
    s[n] = '\0';
    return s;
}

/* A malloc'd UTF-8 copy of a string element; *oom set on allocation failure. */
char *get_str(Ctx &c, const Node *n, StrKind kind, bool *oom)
{
    const char *p;
    size_t len;
    if (!raw_value(c.t, n, &p, &len))
        return nullptr;
    trim(&p, &len);
    bool ascii = true;
    for (size_t i = 0; i < len && ascii; i++)
        ascii = (unsigned char)p[i] >= 0x20 && (unsigned char)p[i] < 0x80;
    if (ascii) /* the common case needs no conversion */
        return dup_str(p, len, oom);
    if (kind == K_ASCII) {
        static const Charset plain;
        lcdcm::to_utf8(c.tmp, plain, p, len, false);
    } else {
        lcdcm::to_utf8(c.tmp, c.cs, p, len, kind == K_PN);
    }
    return dup_str(c.tmp.data(), c.tmp.size(), oom);
}

/* Lenient check of identity values: they end up in object names and SQL keys, so only
 * [0-9A-Za-z._-] is let through (anonymisers write hashes; real UIDs are digits and dots); the
 * strict grammar is lc_dicom_uid_valid's business. */
bool uid_chars_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
              ch == '.' || ch == '-' || ch == '_'))
            return false;
    }
    return true;
}

struct StrField {
    uint32_t tag;
    size_t off;
    StrKind kind;
};
#define F(tag, field, kind)                                                                        \
    {                                                                                              \
        tag, offsetof(lc_dicom_header, field), kind                                                \
    }
const StrField kStrFields[] = {
    F(0x00100010, patient_name, K_PN),
    F(0x00100020, patient_id, K_TEXT),
    F(0x00100030, patient_birth_date, K_ASCII),
    F(0x00100040, patient_sex, K_ASCII),
    F(0x00080020, study_date, K_ASCII),
    F(0x00080030, study_time, K_ASCII),
    F(0x00080050, accession_number, K_TEXT),
    F(0x00200010, study_id, K_TEXT),
    F(0x00081030, study_description, K_TEXT),
    F(0x00080090, referring_physician_name, K_PN),
    F(0x00080060, modality, K_ASCII),
    F(0x0008103E, series_description, K_TEXT),
    F(0x00180015, body_part_examined, K_ASCII),
    F(0x00280004, photometric_interpretation, K_ASCII),
    F(0x00100021, issuer_of_patient_id, K_TEXT),
    F(0x00080080, institution_name, K_TEXT),
    F(0x00080201, timezone_offset, K_ASCII),
    F(0x00080021, series_date, K_ASCII),
    F(0x00080031, series_time, K_ASCII),
    F(0x00080023, content_date, K_ASCII),
    F(0x00080033, content_time, K_ASCII),
    F(0x00400244, pps_start_date, K_ASCII),
    F(0x00400245, pps_start_time, K_ASCII),
};
#undef F

/* Geometry, with the Enhanced (multi-frame) functional groups as fallback: shared groups
 * for orientation, spacing and rescale, the first frame's group for the position. */
void fill_geometry(const Ctx &c, lc_dicom_header *h)
{
    const Tree &t = c.t;
    const Node *shared = first_item(t, c.find(0x52009229));
    const Node *frame1 = first_item(t, c.find(0x52009230));
    auto fg = [&](uint32_t seq, uint32_t tag, double *out, int count) {
        for (const Node *grp : {shared, frame1}) {
            const Node *it = grp ? first_item(t, find_child(t, grp, seq)) : nullptr;
            if (it && get_ds(t, find_child(t, it, tag), out, count))
                return true;
        }
        return false;
    };
    h->has_ipp = get_ds(t, c.find(0x00200032), h->ipp, 3) || fg(0x00209113, 0x00200032, h->ipp, 3);
    h->has_iop = get_ds(t, c.find(0x00200037), h->iop, 6) || fg(0x00209116, 0x00200037, h->iop, 6);
    h->has_pixel_spacing = get_ds(t, c.find(0x00280030), h->pixel_spacing, 2) ||
                           fg(0x00289110, 0x00280030, h->pixel_spacing, 2);
    h->has_slice_thickness = get_ds(t, c.find(0x00180050), &h->slice_thickness, 1) ||
                             fg(0x00289110, 0x00180050, &h->slice_thickness, 1);
    double v;
    h->rescale_slope = 1.0;
    h->rescale_intercept = 0.0;
    if (get_ds(t, c.find(0x00281053), &v, 1) || fg(0x00289145, 0x00281053, &v, 1))
        if (v != 0.0)
            h->rescale_slope = v;
    if (get_ds(t, c.find(0x00281052), &v, 1) || fg(0x00289145, 0x00281052, &v, 1))
        h->rescale_intercept = v;
}

/* The RequestAttributesSequence: its first item's two IDs and the whole sequence as JSON. */
bool fill_request(Ctx &c, lc_dicom_header *h, bool pixrep1)
{
    bool oom = false;
    const Node *seq = c.find(0x00400275);
    const Node *item = first_item(c.t, seq);
    if (!item)
        return true;
    h->scheduled_procedure_step_id = get_str(c, find_child(c.t, item, 0x00400009), K_TEXT, &oom);
    h->requested_procedure_id = get_str(c, find_child(c.t, item, 0x00401001), K_TEXT, &oom);
    std::string js, path = "00400275/";
    lcdcm::JsonOpts o{LC_DICOM_JSON_INLINE_MAX, pixrep1};
    lcdcm::json_items(js, c.t, size_t(seq - c.t.nodes.data()), c.cs, o, path);
    if (!oom)
        h->request_attributes = dup_str(js.data(), js.size(), &oom);
    return !oom;
}

/* Fill h from a checked tree; LC_ERR_DICOM when an identity UID is missing or bad. */
lc_rc fill_header(const Scan &s, unsigned flags, lc_dicom_header *h, lc_err *err)
{
    Ctx c(s.tree);
    const Tree &t = s.tree;
    bool oom = false;

    /* Specific Character Set first: every text value depends on it */
    h->specific_character_set = get_str(c, c.find(0x00080005), K_ASCII, &oom);
    if (!h->specific_character_set && !oom)
        h->specific_character_set = dup_str("", 0, &oom);
    if (oom)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    c.cs = lcdcm::parse_charset(h->specific_character_set);

    struct {
        char **dst;
        uint32_t tag;
        const char *what;
    } uids[] = {
        {&h->study_instance_uid, 0x0020000D, "StudyInstanceUID"},
        {&h->series_instance_uid, 0x0020000E, "SeriesInstanceUID"},
        {&h->sop_instance_uid, 0x00080018, "SOPInstanceUID"},
    };
    for (auto &u : uids) {
        *u.dst = get_str(c, c.find(u.tag), K_ASCII, &oom);
        if (oom)
            return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        if (!*u.dst || !**u.dst)
            return lc_err_set(err, LC_ERR_DICOM, "%s is missing", u.what);
        if (!uid_chars_ok(*u.dst))
            return lc_err_set(err, LC_ERR_DICOM, "%s \"%.64s\" is not a UID", u.what, *u.dst);
    }
    h->sop_class_uid = get_str(c, c.find(0x00080016), K_ASCII, &oom);
    if (!h->sop_class_uid && !oom)
        h->sop_class_uid = dup_str(s.meta_sop_class.data(), s.meta_sop_class.size(), &oom);
    h->transfer_syntax_uid = dup_str(s.ts_uid.data(), s.ts_uid.size(), &oom);
    for (const StrField &sf : kStrFields)
        *(char **)((char *)h + sf.off) = get_str(c, c.find(sf.tag), sf.kind, &oom);
    if (oom)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");

    get_is(t, c.find(0x00200011), &h->series_number);
    get_is(t, c.find(0x00200013), &h->instance_number);
    get_is(t, c.find(0x00201002), &h->images_in_acquisition);
    get_is(t, c.find(0x00200105), &h->number_of_temporal_positions);
    get_us(t, c.find(0x00280010), &h->rows);
    get_us(t, c.find(0x00280011), &h->columns);
    get_us(t, c.find(0x00280002), &h->samples_per_pixel);
    get_us(t, c.find(0x00280100), &h->bits_allocated);
    get_us(t, c.find(0x00280101), &h->bits_stored);
    get_us(t, c.find(0x00280103), &h->pixel_representation);
    h->high_bit = -1;
    get_us(t, c.find(0x00280102), &h->high_bit);
    if (!get_is(t, c.find(0x00280008), &h->number_of_frames) || h->number_of_frames < 0)
        h->number_of_frames = 0;
    if (h->number_of_frames == 0 && h->rows > 0)
        h->number_of_frames = 1;
    fill_geometry(c, h);
    h->has_pixel_data = s.has_pixel_data;
    const bool pixrep1 = h->pixel_representation == 1;
    if (!fill_request(c, h, pixrep1))
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");

    if (flags & LC_DICOM_JSON) {
        std::string js, path;
        js.reserve(4096);
        lcdcm::JsonOpts o{LC_DICOM_JSON_INLINE_MAX, pixrep1};
        lcdcm::json_dataset(js, t, SIZE_MAX, c.cs, o, path);
        if (js.size() > LC_DICOM_JSON_MAX)
            return lc_err_set(err, LC_ERR_DICOM,
                              "header is too large for DICOM JSON (%zu bytes, at most %u)",
                              js.size(), LC_DICOM_JSON_MAX);
        h->json = dup_str(js.data(), js.size(), &oom);
        if (oom)
            return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        h->json_len = js.size();
    }
    return LC_OK;
}

/* GDCM reads the whole checked data set with the scanned syntax (pixel decode only). */
void gdcm_read(const Scan &s, const unsigned char *input, gdcm::DataSet &ds)
{
    const unsigned char *p = s.deflated ? reinterpret_cast<const unsigned char *>(s.inflated.data())
                                        : input + s.ds_start;
    const size_t n = s.deflated ? s.stop : s.stop - s.ds_start;
    MemBuf mb(p, n);
    std::istream is(&mb);
    switch (s.enc) {
    case Enc::ImplicitLE:
        ds.Read<gdcm::ImplicitDataElement, gdcm::SwapperNoOp>(is);
        break;
    case Enc::ExplicitLE:
        ds.Read<gdcm::ExplicitDataElement, gdcm::SwapperNoOp>(is);
        break;
    case Enc::ExplicitBE:
        ds.Read<gdcm::ExplicitDataElement, gdcm::SwapperDoOp>(is);
        break;
    }
}

/* Walk in (up to Pixel Data, or all of it when full) and fill a new header from the tree. */
lc_rc read_header(Input &in, bool full, unsigned flags, const char *what, Scan &s,
                  lc_dicom_header **out, lc_err *err)
{
    std::string why;
    lc_rc rc = lcdcm::scan(in, full, s, why);
    if (rc != LC_OK)
        return lc_err_set(err, rc, "could not parse %s: %s", what, why.c_str());
    lc_dicom_header *h = (lc_dicom_header *)calloc(1, sizeof(*h));
    if (!h)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    rc = fill_header(s, flags, h, err);
    if (rc != LC_OK) {
        if (rc == LC_ERR_DICOM)
            lc_err_wrap(err, "could not parse %s", what);
        lc_dicom_header_free(h);
        return rc;
    }
    *out = h;
    return LC_OK;
}

/* Open path for reading; its size in *size. */
lc_rc open_input(const char *path, int *fd, size_t *size, lc_err *err)
{
    *fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* a FIFO must not block us */
    if (*fd < 0)
        return lc_err_set(err, errno == ENOENT ? LC_ERR_NOT_FOUND : LC_ERR_IO,
                          "could not open \"%s\": %s", path, strerror(errno));
    struct stat st;
    const bool stat_ok = fstat(*fd, &st) == 0;
    if (!stat_ok || !S_ISREG(st.st_mode)) {
        const int e = errno;
        close(*fd);
        *fd = -1;
        return lc_err_set(err, LC_ERR_IO, "could not read \"%s\": %s", path,
                          stat_ok ? "not a regular file" : strerror(e));
    }
    *size = size_t(st.st_size);
    return LC_OK;
}

/* SHA-256 and size of the whole file: the bytes the walk loaded, then the rest from fd. */
lc_rc hash_file(const char *path, int fd, const Input &in, char hex[65], long long *size,
                lc_err *err)
{
    lc_sha256 *h = lc_sha256_new();
    if (!h)
        return lc_err_set(err, LC_ERR_NOMEM, "could not hash \"%s\"", path);
    long long total = (long long)in.have();
    std::vector<char> buf(256 * 1024);
    lc_sha256_update(h, in.data(), in.have());
    for (;;) {
        ssize_t r = read(fd, buf.data(), buf.size());
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            lc_sha256_free(h);
            return lc_err_set(err, LC_ERR_IO, "could not read \"%s\": %s", path, strerror(errno));
        }
        if (r == 0)
            break;
        lc_sha256_update(h, buf.data(), size_t(r));
        total += r;
    }
    lc_sha256_final_hex(h, hex);
    lc_sha256_free(h);
    *size = total;
    return LC_OK;
}

} // namespace

/* ---- C API: headers ---------------------------------------------------------------------- */

lc_rc lc_dicom_read_header_ex(const char *path, unsigned flags, lc_dicom_header **out, lc_err *err)
{
    *out = nullptr;
    int fd = -1;
    size_t size = 0;
    lc_rc rc = open_input(path, &fd, &size, err);
    if (rc != LC_OK)
        return rc;
    try {
        Input in(fd, size);
        Scan s;
        std::string what = std::string("\"") + path + "\"";
        rc = read_header(in, false, flags, what.c_str(), s, out, err);
        if (rc == LC_OK && (flags & LC_DICOM_SHA256)) {
            rc = hash_file(path, fd, in, (*out)->sha256, &(*out)->file_size, err);
            if (rc != LC_OK) {
                lc_dicom_header_free(*out);
                *out = nullptr;
            }
        }
    } catch (const std::bad_alloc &) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory reading \"%s\"", path);
    } catch (const std::exception &e) {
        rc = lc_err_set(err, LC_ERR_DICOM, "could not parse \"%s\": %s", path, e.what());
    } catch (...) {
        rc = lc_err_set(err, LC_ERR_DICOM, "could not parse \"%s\": unknown error", path);
    }
    if (rc != LC_OK && *out) {
        lc_dicom_header_free(*out);
        *out = nullptr;
    }
    close(fd);
    return rc;
}

lc_rc lc_dicom_read_header(const char *path, lc_dicom_header **out, lc_err *err)
{
    return lc_dicom_read_header_ex(path, 0, out, err);
}

lc_rc lc_dicom_read_header_buf_ex(const void *buf, size_t len, unsigned flags,
                                  lc_dicom_header **out, lc_err *err)
{
    *out = nullptr;
    if (!buf)
        len = 0;
    lc_rc rc;
    try {
        Input in(buf, len);
        Scan s;
        rc =
            read_header(in, false, flags & ~unsigned(LC_DICOM_SHA256), "DICOM buffer", s, out, err);
    } catch (const std::bad_alloc &) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory reading DICOM buffer");
    } catch (const std::exception &e) {
        rc = lc_err_set(err, LC_ERR_DICOM, "could not parse DICOM buffer: %s", e.what());
    } catch (...) {
        rc = lc_err_set(err, LC_ERR_DICOM, "could not parse DICOM buffer: unknown error");
    }
    if (rc != LC_OK && *out) {
        lc_dicom_header_free(*out);
        *out = nullptr;
    }
    return rc;
}

lc_rc lc_dicom_read_header_buf(const void *buf, size_t len, lc_dicom_header **out, lc_err *err)
{
    return lc_dicom_read_header_buf_ex(buf, len, 0, out, err);
}

void lc_dicom_header_free(lc_dicom_header *h)
{
    if (!h)
        return;
    char *const fixed[] = {h->sop_class_uid,
                           h->sop_instance_uid,
                           h->study_instance_uid,
                           h->series_instance_uid,
                           h->transfer_syntax_uid,
                           h->specific_character_set,
                           h->scheduled_procedure_step_id,
                           h->requested_procedure_id,
                           h->request_attributes,
                           h->json};
    for (char *s : fixed)
        free(s);
    for (const StrField &sf : kStrFields)
        free(*(char **)((char *)h + sf.off));
    free(h);
}

/* ---- pixels ------------------------------------------------------------------------------ */

namespace
{

/* Decoded stored values to float: the Bits Stored window (High Bit), the sign, the rescale. */
void to_f32(const gdcm::PixelFormat &pf, const char *b, size_t count, double slope,
            double intercept, float *dst)
{
    const unsigned alloc = pf.GetBitsAllocated();
    const unsigned stored = pf.GetBitsStored(), high = pf.GetHighBit();
    const unsigned shift = high + 1 - stored;
    const uint64_t mask = (1ULL << stored) - 1;
    const uint64_t sign = 1ULL << (stored - 1);
    const bool is_signed = pf.GetPixelRepresentation() == 1;
    for (size_t i = 0; i < count; i++) {
        uint64_t u;
        if (alloc == 1) {
            u = (static_cast<unsigned char>(b[i >> 3]) >> (i & 7)) & 1u;
        } else if (alloc == 8) {
            u = static_cast<unsigned char>(b[i]);
        } else if (alloc == 16) {
            uint16_t v;
            memcpy(&v, b + 2 * i, 2);
            u = v;
        } else {
            uint32_t v;
            memcpy(&v, b + 4 * i, 4);
            u = v;
        }
        u = (u >> shift) & mask;
        double d = (is_signed && (u & sign)) ? double(int64_t(u | ~mask)) : double(u);
        dst[i] = float(d * slope + intercept);
    }
}

void swap_units(char *p, size_t n, unsigned unit)
{
    for (size_t i = 0; i + unit <= n; i += unit)
        std::reverse(p + i, p + i + unit);
}

/* Native big endian Pixel Data: GDCM swapped the value while reading in units of its VR (OW: 2
 * bytes, OB/UN: none); make the samples host order whatever the VR said. */
void fix_big_endian(std::vector<char> &raw, const gdcm::VR &vr, unsigned alloc)
{
    unsigned unit = vr == gdcm::VR::OW ? 2 : (vr == gdcm::VR::OL || vr == gdcm::VR::OF) ? 4 : 1;
    unsigned want = alloc / 8;
    if (want <= 1 || unit == want)
        return;
    if (unit > 1)
        swap_units(raw.data(), raw.size(), unit); /* back to the file's byte order */
    swap_units(raw.data(), raw.size(), want);
}

/* All fragments of the Pixel Data in one buffer (GDCM's JPEG and JPEG-LS codecs see them so). */
bool fragments_joined(const gdcm::DataElement &pd, std::vector<char> &all)
{
    const gdcm::SequenceOfFragments *sf = pd.GetSequenceOfFragments();
    if (!sf || sf->GetNumberOfFragments() == 0)
        return false;
    all.resize(sf->ComputeByteLength());
    return !all.empty() && sf->GetBuffer(all.data(), all.size());
}

uint32_t le32(const unsigned char *p)
{
    return uint32_t(p[3]) << 24 | uint32_t(p[2]) << 16 | uint32_t(p[1]) << 8 | p[0];
}

uint16_t be16(const unsigned char *p)
{
    return uint16_t(p[0] << 8 | p[1]);
}
uint32_t be32(const unsigned char *p)
{
    return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3];
}

/*
 * GDCM 3.0.21's JPEG 2000 decoder (JPEG2000Codec::DecodeByStreamsCommon) sizes its output from
 * the DICOM header but writes what the codestream's SIZ marker says (a heap overflow, fixed
 * upstream as CVE-2024-22373), asserts when the buffer has no 0xD9 byte, when the component
 * count differs or when COD asks for a colour transform, and reads COD without a bounds
 * check. So each codestream it will decode is checked here first; JP2 files (a non-conformant
 * wrapper) are refused.
 */
bool j2k_codestream_ok(const unsigned char *p, size_t n, int rows, int cols, int alloc,
                       std::string &why)
{
    if (n < 47 || be16(p) != 0xFF4F || be16(p + 2) != 0xFF51) {
        why = "not a JPEG 2000 codestream (SOC, SIZ)";
        return false;
    }
    const uint32_t x = be32(p + 8), y = be32(p + 12), x0 = be32(p + 16), y0 = be32(p + 20);
    const unsigned comps = be16(p + 40), ssiz = p[42], dx = p[43], dy = p[44];
    if (be16(p + 4) != 41 || comps != 1) {
        why = strf("JPEG 2000 codestream with %u components", comps);
        return false;
    }
    if (x <= x0 || y <= y0 || x - x0 != uint32_t(cols) || y - y0 != uint32_t(rows) || dx != 1 ||
        dy != 1) {
        why = strf("JPEG 2000 codestream of %u x %u does not match the header's %d x %d", x - x0,
                   y - y0, cols, rows);
        return false;
    }
    const unsigned prec = (ssiz & 0x7F) + 1, bytes = prec <= 8 ? 1 : prec <= 16 ? 2 : 4;
    if (prec > 32 || int(bytes * 8) > alloc) {
        why = strf("JPEG 2000 precision %u does not fit %d bits allocated", prec, alloc);
        return false;
    }
    if (!memchr(p, 0xD9, n)) {
        why = "JPEG 2000 codestream without an end marker";
        return false;
    }
    /* the main header must carry COD (before SOD) with no colour transform, as GDCM reads it */
    size_t i = 2;
    while (i + 4 <= n) {
        const unsigned m = be16(p + i);
        if (m == 0xFF93 || m == 0xFFD9 || (m & 0xFF00) != 0xFF00)
            break;
        if (m == 0xFF4F || m == 0xFF92 || (m >= 0xFF30 && m <= 0xFF3F)) {
            i += 2;
            continue;
        }
        const size_t len = be16(p + i + 2);
        if (len < 2 || i + 2 + len > n)
            break;
        if (m == 0xFF52) {
            if (len >= 12 && p[i + 4 + 4] == 0 && p[i + 4 + 9] <= 1)
                return true;
            break;
        }
        i += 2 + len;
    }
    why = "JPEG 2000 main header without a usable COD marker";
    return false;
}

/* Check every codestream GDCM will hand to openjpeg: all fragments together for one frame,
 * one fragment per frame otherwise. */
bool j2k_ok(const gdcm::DataElement &pd, int rows, int cols, int frames, int alloc,
            std::string &why)
{
    const gdcm::SequenceOfFragments *sf = pd.GetSequenceOfFragments();
    if (!sf || sf->GetNumberOfFragments() == 0) {
        why = "no JPEG 2000 fragments";
        return false;
    }
    if (frames == 1) {
        std::vector<char> all;
        if (!fragments_joined(pd, all)) {
            why = "unreadable JPEG 2000 fragments";
            return false;
        }
        return j2k_codestream_ok(reinterpret_cast<const unsigned char *>(all.data()), all.size(),
                                 rows, cols, alloc, why);
    }
    if (sf->GetNumberOfFragments() != size_t(frames)) {
        why = strf("%zu JPEG 2000 fragments for %d frames", size_t(sf->GetNumberOfFragments()),
                   frames);
        return false;
    }
    for (size_t k = 0; k < sf->GetNumberOfFragments(); k++) {
        const gdcm::ByteValue *bv = sf->GetFragment(k).GetByteValue();
        if (!bv || !bv->GetPointer() ||
            !j2k_codestream_ok(reinterpret_cast<const unsigned char *>(bv->GetPointer()),
                               bv->GetLength(), rows, cols, alloc, why))
            return false;
    }
    return true;
}

/*
 * The frames of a JPEG or JPEG-LS stream (all fragments joined): each starts with SOI and has
 * one SOF for a rows x cols single-component image whose precision fits the bits allocated;
 * starts gets the offset of each SOI. Markers are found by walking the segments and skipping
 * entropy-coded data, where neither SOI nor SOF can occur. GDCM 3.0.21 asserts when a decoded
 * frame is smaller than the DICOM header promises.
 */
bool jpeg_ok(const unsigned char *p, size_t n, bool ls, int rows, int cols, int frames, int alloc,
             std::vector<size_t> &starts, std::string &why)
{
    std::vector<int> sofs; /* SOF count per frame */
    bool in_frame = false;
    size_t i = 0;
    while (i + 1 < n) {
        if (p[i] != 0xFF || p[i + 1] == 0xFF) { /* padding between frames, fill bytes */
            if (in_frame && p[i] != 0xFF) {
                /* libjpeg warns (JWRN_EXTRANEOUS_DATA) and GDCM asserts on any warning */
                why = "extraneous bytes between JPEG markers";
                return false;
            }
            i++;
            continue;
        }
        const unsigned m = p[i + 1];
        if (m == 0xD8) {
            starts.push_back(i);
            sofs.push_back(0);
            in_frame = true;
        } else if (m == 0xD9) {
            in_frame = false;
        }
        if (m == 0x00 || m == 0x01 || (m >= 0xD0 && m <= 0xD9)) { /* RSTn, SOI, EOI, TEM */
            i += 2;
            continue;
        }
        if (i + 4 > n || be16(p + i + 2) < 2 || i + 2 + be16(p + i + 2) > n || sofs.empty()) {
            why = "malformed JPEG marker segment";
            return false;
        }
        const size_t len = be16(p + i + 2);
        if (m == 0xE0 && len >= 16 && memcmp(p + i + 4, "JFIF", 5) == 0 && p[i + 9] != 1) {
            why = "JFIF marker of an unknown major version"; /* another libjpeg warning */
            return false;
        }
        const bool sof =
            ls ? m == 0xF7 : (m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC);
        if (sof) {
            const unsigned prec = len >= 8 ? p[i + 4] : 0;
            const int y = len >= 8 ? be16(p + i + 5) : -1, x = len >= 8 ? be16(p + i + 7) : -1;
            const unsigned comps = len >= 8 ? p[i + 9] : 0;
            const int bytes = prec <= 8 ? 1 : 2;
            if (comps != 1 || y != rows || x != cols || prec < 2 || prec > 16 ||
                bytes * 8 != alloc) {
                why = strf("JPEG frame of %d x %d, %u components, %u bits does not match the "
                           "header's %d x %d, %d bits allocated",
                           x, y, comps, prec, cols, rows, alloc);
                return false;
            }
            sofs.back()++;
        }
        i += 2 + len;
        if (m == 0xDA) /* SOS: entropy-coded data runs to the next marker */
            while (i + 1 < n && !(p[i] == 0xFF && (ls ? p[i + 1] >= 0x80
                                                      : p[i + 1] != 0x00 && !(p[i + 1] >= 0xD0 &&
                                                                              p[i + 1] <= 0xD7))))
                i++;
    }
    if (starts.size() != size_t(frames) ||
        std::any_of(sofs.begin(), sofs.end(), [](int k) { return k != 1; })) {
        why = strf("%zu JPEG frames for %d in the header", starts.size(), frames);
        return false;
    }
    return true;
}

/* The same frames, one fragment each: GDCM's JPEG codecs map fragment i to frame i (and assert
 * when a fragment past the last frame fails), so fragmented frames are joined first. */
gdcm::DataElement one_fragment_per_frame(const gdcm::DataElement &pd, const std::vector<char> &all,
                                         const std::vector<size_t> &starts)
{
    gdcm::SmartPointer<gdcm::SequenceOfFragments> sq = new gdcm::SequenceOfFragments;
    for (size_t k = 0; k < starts.size(); k++) {
        const size_t end = k + 1 < starts.size() ? starts[k + 1] : all.size();
        gdcm::Fragment frag;
        frag.SetByteValue(all.data() + starts[k], gdcm::VL(uint32_t(end - starts[k])));
        sq->AddFragment(frag);
    }
    gdcm::DataElement out(pd.GetTag());
    out.SetVR(pd.GetVR());
    out.SetValue(*sq);
    return out;
}

/* RLE (PS3.5 G.4): one fragment per frame, each with a 64-byte header of as many segments as
 * bytes per sample, at increasing offsets inside the fragment. GDCM 3.0.21 trusts the header
 * (an out-of-bounds read, CVE-2025-48429 upstream). */
bool rle_ok(const gdcm::DataElement &pd, int frames, int alloc, std::string &why)
{
    const gdcm::SequenceOfFragments *sf = pd.GetSequenceOfFragments();
    if (!sf || sf->GetNumberOfFragments() != size_t(frames)) {
        why = strf("%zu RLE fragments for %d frames",
                   sf ? size_t(sf->GetNumberOfFragments()) : size_t(0), frames);
        return false;
    }
    const uint32_t want = alloc <= 8 ? 1 : uint32_t(alloc / 8);
    for (size_t k = 0; k < sf->GetNumberOfFragments(); k++) {
        const gdcm::ByteValue *bv = sf->GetFragment(k).GetByteValue();
        const unsigned char *p =
            bv ? reinterpret_cast<const unsigned char *>(bv->GetPointer()) : nullptr;
        const size_t n = bv ? size_t(bv->GetLength()) : 0;
        if (!p || n < 64 || le32(p) != want || le32(p + 4) != 64) {
            why = strf("malformed RLE header in fragment %zu", k + 1);
            return false;
        }
        for (uint32_t sgm = 1; sgm < want; sgm++) {
            if (le32(p + 4 + 4 * sgm) <= le32(p + 4 * sgm) || le32(p + 4 + 4 * sgm) >= n) {
                why = strf("malformed RLE segment offsets in fragment %zu", k + 1);
                return false;
            }
        }
    }
    return true;
}

/* Upper bound on decoded voxels (2 GiB of float32): larger inputs are refused up front, so a
 * hostile Rows x Columns x NumberOfFrames cannot make us allocate without limit. */
const uint64_t kMaxVoxels = 1ULL << 29;

/*
 * Pixels through GDCM's codecs, fed from our own parse: a gdcm::Bitmap gets the dimensions,
 * pixel format, photometric interpretation and transfer syntax of the checked header, and the
 * Pixel Data element. gdcm::ImageReader is not used: on hostile but well-formed input its
 * attribute helpers assert (abort), e.g. on a malformed ImageOrientationPatient in a
 * functional group (found by fuzzing).
 */
lc_rc read_pixels(const char *path, int fd, size_t size, float **out, int *rows, int *columns,
                  int *frames, lc_err *err)
{
    Input in(fd, size);
    if (!in.need(size))
        return lc_err_set(err, in.io_errno ? LC_ERR_IO : LC_ERR_DICOM, "could not read \"%s\": %s",
                          path, in.io_errno ? strerror(in.io_errno) : "file shrank while reading");
    Scan s;
    lc_dicom_header *h = nullptr;
    std::string what = std::string("\"") + path + "\"";
    lc_rc rc = read_header(in, true, 0, what.c_str(), s, &h, err);
    if (rc != LC_OK)
        return rc;
    const int r = h->rows, c = h->columns, nf = h->number_of_frames, alloc = h->bits_allocated;
    const double slope = h->rescale_slope, intercept = h->rescale_intercept;
    const std::string pi = h->photometric_interpretation ? h->photometric_interpretation : "";
    const int spp = h->samples_per_pixel ? h->samples_per_pixel : 1;
    int stored = h->bits_stored, high = h->high_bit, pixrep = h->pixel_representation;
    lc_dicom_header_free(h);
    gdcm_quiet();
    gdcm::DataSet ds;
    try {
        gdcm_read(s, in.data(), ds);
    } catch (const std::bad_alloc &) {
        throw;
    } catch (const std::exception &e) {
        return lc_err_set(err, LC_ERR_DICOM, "could not parse %s: %s", what.c_str(), e.what());
    }
    const gdcm::Tag kPixelData(0x7fe0, 0x0010);
    const gdcm::DataElement &pde = ds.GetDataElement(kPixelData);
    const gdcm::DataElement *pd = pde.GetTag() == kPixelData ? &pde : nullptr;
    if (!s.has_pixel_data)
        return lc_err_set(err, LC_ERR_DICOM, "could not read pixels of \"%s\": no pixel data",
                          path);
    if (!pd)
        return lc_err_set(
            err, LC_ERR_UNSUPPORTED,
            "could not read pixels of \"%s\": floating point pixel data is not supported", path);
    if (pd->IsEmpty())
        return lc_err_set(err, LC_ERR_DICOM, "could not read pixels of \"%s\": empty pixel data",
                          path);
    if (spp != 1 || (pi != "" && pi != "MONOCHROME1" && pi != "MONOCHROME2"))
        return lc_err_set(err, LC_ERR_UNSUPPORTED,
                          "could not read pixels of \"%s\": colour images (%d samples per pixel, "
                          "%s) are not supported",
                          path, spp, pi.empty() ? "no photometric interpretation" : pi.c_str());
    if (alloc != 1 && alloc != 8 && alloc != 16 && alloc != 32)
        return lc_err_set(err, LC_ERR_UNSUPPORTED,
                          "could not read pixels of \"%s\": %d bits allocated is not supported",
                          path, alloc);
    if (r <= 0 || c <= 0 || nf <= 0)
        return lc_err_set(err, LC_ERR_DICOM,
                          "could not read pixels of \"%s\": bad dimensions %d x %d x %d", path, c,
                          r, nf);
    const uint64_t count = uint64_t(r) * uint64_t(c) * uint64_t(nf);
    if (count > kMaxVoxels)
        return lc_err_set(err, LC_ERR_UNSUPPORTED,
                          "could not read pixels of \"%s\": %d x %d x %d voxels is over the limit",
                          path, c, r, nf);
    const size_t need = alloc == 1 ? size_t((count + 7) / 8) : size_t(count) * size_t(alloc / 8);
    const gdcm::ByteValue *native = pd->GetByteValue();
    if (native && native->GetLength() < need)
        return lc_err_set(err, LC_ERR_DICOM,
                          "could not read pixels of \"%s\": pixel data has %u bytes, %zu expected",
                          path, unsigned(native->GetLength()), need);
    if (!native && !pd->GetSequenceOfFragments())
        return lc_err_set(err, LC_ERR_DICOM,
                          "could not read pixels of \"%s\": malformed pixel data", path);

    /* the pixel format as the header says, made consistent */
    if (stored <= 0 || stored > alloc)
        stored = alloc;
    if (high < stored - 1 || high >= alloc)
        high = stored - 1;
    if (pixrep != 0 && pixrep != 1)
        pixrep = 0;
    gdcm::TransferSyntax ts;
    if (s.deflated || s.ts_uid.empty())
        ts = s.enc == Enc::ImplicitLE   ? gdcm::TransferSyntax::ImplicitVRLittleEndian
             : s.enc == Enc::ExplicitBE ? gdcm::TransferSyntax::ExplicitVRBigEndian
                                        : gdcm::TransferSyntax::ExplicitVRLittleEndian;
    else
        ts = gdcm::TransferSyntax(gdcm::TransferSyntax::GetTSType(s.ts_uid.c_str()));
    if (ts.IsEncapsulated() != (native == nullptr))
        return lc_err_set(err, LC_ERR_DICOM,
                          "could not read pixels of \"%s\": %s pixel data in transfer syntax %s",
                          path, native ? "native" : "encapsulated", s.ts_uid.c_str());

    /* the codecs of GDCM 3.0.21 trust the compressed stream over the header: check first */
    gdcm::DataElement pixels = *pd;
    std::string why;
    bool ok = true;
    if (ts == gdcm::TransferSyntax::JPEG2000Lossless || ts == gdcm::TransferSyntax::JPEG2000 ||
        ts == gdcm::TransferSyntax::JPEG2000Part2Lossless ||
        ts == gdcm::TransferSyntax::JPEG2000Part2) {
        ok = j2k_ok(*pd, r, c, nf, alloc, why);
    } else if (ts == gdcm::TransferSyntax::RLELossless) {
        ok = rle_ok(*pd, nf, alloc, why);
    } else if (ts.IsEncapsulated()) {
        const bool ls = ts == gdcm::TransferSyntax::JPEGLSLossless ||
                        ts == gdcm::TransferSyntax::JPEGLSNearLossless;
        std::vector<char> all;
        std::vector<size_t> starts;
        ok = fragments_joined(*pd, all) &&
             jpeg_ok(reinterpret_cast<const unsigned char *>(all.data()), all.size(), ls, r, c, nf,
                     alloc, starts, why);
        if (ok)
            pixels = one_fragment_per_frame(*pd, all, starts);
        else if (why.empty())
            why = "unreadable fragments";
    }
    if (!ok)
        return lc_err_set(err, LC_ERR_DICOM, "could not decode pixel data of \"%s\": %s", path,
                          why.c_str());

    gdcm::Bitmap bm;
    bm.SetNumberOfDimensions(nf > 1 ? 3 : 2);
    bm.SetDimension(0, unsigned(c));
    bm.SetDimension(1, unsigned(r));
    if (nf > 1)
        bm.SetDimension(2, unsigned(nf));
    bm.SetPixelFormat(gdcm::PixelFormat(1, (unsigned short)alloc, (unsigned short)stored,
                                        (unsigned short)high, (unsigned short)pixrep));
    bm.SetPhotometricInterpretation(pi == "MONOCHROME1"
                                        ? gdcm::PhotometricInterpretation::MONOCHROME1
                                        : gdcm::PhotometricInterpretation::MONOCHROME2);
    bm.SetTransferSyntax(ts);
    bm.SetDataElement(pixels);
    if (bm.GetBufferLength() != need)
        return lc_err_set(err, LC_ERR_DICOM,
                          "could not read pixels of \"%s\": decoded size %lu, %zu expected", path,
                          bm.GetBufferLength(), need);
    std::vector<char> raw(need);
    if (!bm.GetBuffer(raw.data()))
        return lc_err_set(err, LC_ERR_DICOM,
                          "could not decode pixel data of \"%s\" (transfer syntax %s)", path,
                          s.ts_uid.empty() ? "implicit VR little endian" : s.ts_uid.c_str());
    /* a codec may correct the pixel format (JPEG precision): read the buffer as decoded */
    const gdcm::PixelFormat &pf = bm.GetPixelFormat();
    if (pf.GetBitsAllocated() != alloc || pf.GetSamplesPerPixel() != 1 || pf.GetBitsStored() == 0 ||
        pf.GetBitsStored() > pf.GetBitsAllocated() || pf.GetHighBit() + 1 < pf.GetBitsStored() ||
        pf.GetHighBit() >= pf.GetBitsAllocated())
        return lc_err_set(err, LC_ERR_DICOM,
                          "could not decode pixel data of \"%s\": inconsistent pixel format", path);
    if (native && s.enc == Enc::ExplicitBE)
        fix_big_endian(raw, pd->GetVR(), unsigned(alloc));
    float *dst = (float *)malloc(size_t(count) * sizeof(float));
    if (!dst)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory for %llu pixels",
                          (unsigned long long)count);
    to_f32(pf, raw.data(), size_t(count), slope, intercept, dst);
    *out = dst;
    *rows = r;
    *columns = c;
    *frames = nf;
    return LC_OK;
}

} // namespace

lc_rc lc_dicom_read_pixels_f32(const char *path, float **out, int *rows, int *columns, int *frames,
                               lc_err *err)
{
    *out = nullptr;
    int fd = -1;
    size_t size = 0;
    lc_rc rc = open_input(path, &fd, &size, err);
    if (rc != LC_OK)
        return rc;
    try {
        rc = read_pixels(path, fd, size, out, rows, columns, frames, err);
    } catch (const std::bad_alloc &) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory decoding \"%s\"", path);
    } catch (const std::exception &e) {
        rc = lc_err_set(err, LC_ERR_DICOM, "could not decode \"%s\": %s", path, e.what());
    } catch (...) {
        rc = lc_err_set(err, LC_ERR_DICOM, "could not decode \"%s\": unknown error", path);
    }
    close(fd);
    return rc;
}

/* ---- strings and UIDs -------------------------------------------------------------------- */

char *lc_dicom_to_utf8(const char *bytes, size_t len, const char *charset)
{
    try {
        std::string s;
        if (bytes && len > 0)
            lcdcm::to_utf8(s, lcdcm::parse_charset(charset), bytes, len, true);
        char *r = (char *)malloc(s.size() + 1);
        if (!r)
            return nullptr;
        memcpy(r, s.data(), s.size());
        r[s.size()] = '\0';
        return r;
    } catch (...) {
        return nullptr;
    }
}

int lc_dicom_uid_valid(const char *uid)
{
    if (!uid)
        return 0;
    size_t n = strlen(uid);
    if (n == 0 || n > 64)
        return 0;
    size_t comp = 0; /* length of the current component */
    for (size_t i = 0; i <= n; i++) {
        char ch = uid[i];
        if (ch == '.' || ch == '\0') {
            if (comp == 0)
                return 0;
            comp = 0;
            continue;
        }
        if (ch < '0' || ch > '9')
            return 0;
        if (comp == 0 && ch == '0' && uid[i + 1] >= '0' && uid[i + 1] <= '9')
            return 0;
        comp++;
    }
    return 1;
}
