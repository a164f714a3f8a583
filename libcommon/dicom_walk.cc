/*
 * dicom_walk.cc: the structural walk of lc_dicom. Every input is walked and bounds-checked
 * here before anything reads a value: every length must fit, every undefined-length sequence
 * and item must be closed, nesting is bounded. The walk records what it checked as an element
 * tree (lcdcm::Tree) that the header fill and the DICOM JSON writer read directly; GDCM only
 * sees the same checked bytes when pixels are decoded. Reentrant; no shared state.
 */
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include <zlib.h>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-copy"
#ifdef __clang__
#pragma clang diagnostic ignored "-Wdeprecated-copy-with-user-provided-copy"
#endif
#include "gdcmSwapper.h"
#include "gdcmTransferSyntax.h"
#pragma GCC diagnostic pop

#include "dicom_internal.h"

namespace lcdcm
{

std::string strf(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    return buf;
}

namespace
{

const uint32_t kUndefined = 0xFFFFFFFFu;
const int kMaxDepth = 64; /* sequence nesting; real objects stay below 10 */
const size_t kMaxInflated = size_t(512) << 20;
/* elements and items recorded per input (24 bytes each): real headers stay below 100 000 */
const size_t kMaxNodes = size_t(1) << 21;

/* VR classes by the VR's two letters: bit 0 a known VR, bit 1 a VR with a 4-byte length. */
struct VrTable {
    unsigned char cls[26][26] = {};
    VrTable()
    {
        static const char known[] =
            "AEASATCSDADSDTFDFLISLOLTOBODOFOLOVOWPNSHSLSQSSSTSVTMUCUIULUNURUSUTUV";
        static const char longs[] = "OBODOFOLOVOWSQSVUCUNURUTUV";
        for (size_t i = 0; i + 1 < sizeof(known); i += 2)
            cls[known[i] - 'A'][known[i + 1] - 'A'] |= 1;
        for (size_t i = 0; i + 1 < sizeof(longs); i += 2)
            cls[longs[i] - 'A'][longs[i + 1] - 'A'] |= 2;
    }
    unsigned char of(const unsigned char *v) const
    {
        const unsigned a = unsigned(v[0]) - 'A', b = unsigned(v[1]) - 'A';
        return a < 26 && b < 26 ? cls[a][b] : 0;
    }
};
const VrTable kVr;

bool known_vr(const unsigned char *v)
{
    return kVr.of(v) & 1;
}

bool long_vr(const unsigned char *v)
{
    return kVr.of(v) & 2;
}

/*
 * A bounds-checking walk over the element structure that records the tree.
 * Why the checks: Debian builds GDCM with assert() enabled, and its readers assert (abort the
 * process) on truncated or inconsistent input, or allocate whatever length a header claims.
 * The walk accepts the subset of encodings GDCM's plain readers handle, so that GDCM can
 * decode pixels from exactly the bytes that were checked, with the transfer syntax found here.
 * Values that are items in disguise (an implicit VR element the dictionary calls SQ, or UN in a
 * little endian data set, CP-246) are walked as sequences on trial: when their content does not
 * parse as items they stay plain values, so the trial never changes what is accepted.
 */
class Walker
{
  public:
    Walker(Input &in, bool big, Tree &t) : in_(in), big_(big), t_(t)
    {
        t_.nodes.reserve(512);
    }
    std::string why;
    bool io_error = false;

    /* The top-level data set from pos. full: walk to the end (pixel decode); otherwise stop
     * after the header of the first element at or past Pixel Data, as GDCM's ReadUpToTag. */
    bool top(size_t pos, bool full, Scan &s)
    {
        const size_t end = in_.total();
        for (;;) {
            if (!in_.need(std::min(pos + 4, end)) && !fail_io(pos))
                return false;
            if (end - pos < 4) { /* GDCM ignores a partial tag at the very end */
                s.stop = pos;
                return true;
            }
            Elem el;
            if (!header(pos, end, s.enc == Enc::ImplicitLE, el))
                return false;
            if (el.g == 0xFFFE) {
                if (el.e == 0xE000)
                    return bad(pos, "item outside a sequence");
                /* a stray delimiter after the last element (a known writer bug) ends the
                 * data set: GDCM gets the part before it */
                s.stop = pos;
                return true;
            }
            const uint32_t tag = uint32_t(el.g) << 16 | el.e;
            if (tag >= 0x7FE00008u && tag <= 0x7FE00010u) {
                s.has_pixel_data = true;
                if (tag == 0x7FE00010u && !full) {
                    s.stop = pos + el.hdr;
                    return true;
                }
            }
            if (!element(pos, end, el, 0, s.enc == Enc::ImplicitLE))
                return false;
            if (!full && tag > 0x7FE00010u) {
                s.stop = pos;
                return true;
            }
        }
    }

  private:
    struct Elem {
        uint16_t g, e;
        uint32_t vl;
        unsigned char vr[2];
        bool has_vr;
        size_t hdr;
    };

    Input &in_;
    bool big_;
    Tree &t_;
    bool trial_ = false; /* inside a trial walk: failures are expected, keep them quiet */

    uint16_t u16(size_t off) const
    {
        const unsigned char *p = in_.data() + off;
        return big_ ? uint16_t(p[0] << 8 | p[1]) : uint16_t(p[1] << 8 | p[0]);
    }
    uint32_t u32(size_t off) const
    {
        const unsigned char *p = in_.data() + off;
        return big_ ? uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]
                    : uint32_t(p[3]) << 24 | uint32_t(p[2]) << 16 | uint32_t(p[1]) << 8 | p[0];
    }
    bool bad(size_t pos, const char *what)
    {
        if (!trial_)
            why = strf("%s at offset %zu", what, pos);
        return false;
    }
    bool fail_io(size_t pos)
    {
        if (in_.io_errno == 0)
            return true; /* not an I/O problem: the caller checks the bounds */
        io_error = true;
        why = strf("read error at offset %zu: %s", pos, strerror(in_.io_errno));
        return false;
    }
    /* [pos, pos + n) lies inside [.., end) and is loaded */
    bool fits(size_t pos, uint64_t n, size_t end)
    {
        if (pos > end || n > uint64_t(end - pos))
            return bad(pos, end == in_.total() ? "truncated data" : "element overruns its item");
        if (!in_.need(pos + size_t(n)))
            return fail_io(pos) ? bad(pos, "truncated data") : false;
        return true;
    }

    /* Record a node; its end is set by close(). */
    bool open(size_t &idx, uint32_t tag, uint16_t vr, uint8_t kind, bool implicit, size_t off,
              uint32_t len, size_t pos)
    {
        if (t_.nodes.size() >= kMaxNodes)
            return bad(pos, "too many data elements");
        idx = t_.nodes.size();
        Node n;
        n.tag = tag;
        n.vr = vr;
        n.kind = kind;
        n.flags = implicit ? N_IMPLICIT : 0;
        n.end = 0;
        n.len = len;
        n.off = off;
        t_.nodes.push_back(n);
        return true;
    }
    void close(size_t idx)
    {
        t_.nodes[idx].end = uint32_t(t_.nodes.size());
    }

    bool header(size_t pos, size_t end, bool implicit, Elem &el)
    {
        if (!fits(pos, 4, end))
            return false;
        el.g = u16(pos);
        el.e = u16(pos + 2);
        el.has_vr = false;
        if (el.g == 0xFFFE || implicit) {
            if (!fits(pos, 8, end))
                return false;
            el.vl = u32(pos + 4);
            el.hdr = 8;
            /* GDCM's fix-ups for two old writers, which it applies to any implicit element:
             * follow them, or GDCM would read a different structure from the one checked */
            if (el.g != 0xFFFE && el.vl == 13 &&
                !(el.g == 0x0008 && (el.e == 0x0070 || el.e == 0x0080)))
                el.vl = 10;
            if (el.g == 0x031E && el.e == 0x0324 && el.vl == 0x31F031C)
                el.vl = 202;
            return true;
        }
        if (!fits(pos, 6, end))
            return false;
        memcpy(el.vr, in_.data() + pos + 4, 2);
        if (!known_vr(el.vr))
            return bad(pos, "invalid VR");
        el.has_vr = true;
        if (long_vr(el.vr)) {
            if (!fits(pos, 12, end))
                return false;
            el.vl = u32(pos + 8);
            el.hdr = 12;
        } else {
            if (!fits(pos, 8, end))
                return false;
            el.vl = u16(pos + 6);
            el.hdr = 8;
            if (el.vl == 6 && el.g == 0x0009 && memcmp(el.vr, "UL", 2) == 0)
                el.vl = 4; /* GDCM's fix-up for a Siemens private UL: follow it */
        }
        if (el.g == 0x00FF && el.e == 0x4AA5)
            return bad(pos, "unsupported tag (00ff,4aa5)"); /* GDCM reads the rest as pixels */
        return true;
    }

    bool is_vr(const Elem &el, const char *vr) const
    {
        return el.has_vr && memcmp(el.vr, vr, 2) == 0;
    }

    /* The element el at pos, recorded with its value; pos moves past it. */
    bool element(size_t &pos, size_t end, const Elem &el, int depth, bool implicit)
    {
        size_t idx;
        const uint32_t tag = uint32_t(el.g) << 16 | el.e;
        if (!open(idx, tag, el.has_vr ? vr2(char(el.vr[0]), char(el.vr[1])) : 0, N_VALUE, implicit,
                  pos + el.hdr, el.vl == kUndefined ? 0 : el.vl, pos))
            return false;
        if (!value(pos, end, el, depth, implicit, idx))
            return false;
        close(idx);
        return true;
    }

    /* The value of el at pos (node idx); pos moves past it. */
    bool value(size_t &pos, size_t end, const Elem &el, int depth, bool implicit, size_t idx)
    {
        const bool pixel = el.g == 0x7FE0 && el.e == 0x0010;
        size_t v = pos + el.hdr;
        if (pixel && is_vr(el, "SQ"))
            return bad(pos, "Pixel Data encoded as a sequence");
        if (el.vl == kUndefined) {
            if (pixel) {
                if (!implicit && !is_vr(el, "OB") && !is_vr(el, "OW") && !is_vr(el, "UN"))
                    return bad(pos, "undefined length Pixel Data with a wrong VR");
                t_.nodes[idx].kind = N_FRAGS;
                pos = v;
                return fragments(pos, end, depth + 1);
            }
            t_.nodes[idx].kind = N_SEQ;
            if (implicit || is_vr(el, "SQ")) {
                pos = v;
                return sequence(pos, end, false, depth + 1, implicit);
            }
            if (is_vr(el, "UN")) {
                /* CP-246: the content is Implicit VR Little Endian; GDCM reads it with the
                 * data set's byte order, so only little endian data sets agree */
                if (big_)
                    return bad(pos, "undefined length UN in a big endian data set");
                pos = v;
                return sequence(pos, end, false, depth + 1, true);
            }
            return bad(pos, "undefined length on a non-sequence element");
        }
        if (!fits(v, el.vl, end))
            return false;
        if (is_vr(el, "SQ")) {
            t_.nodes[idx].kind = N_SEQ;
            t_.nodes[idx].len = 0;
            pos = v;
            return sequence(pos, v + el.vl, true, depth + 1, false);
        }
        pos = v + el.vl;
        const uint32_t tag = uint32_t(el.g) << 16 | el.e;
        if (el.vl >= 8 && (implicit || (is_vr(el, "UN") && !big_)) && dict_is_sq(tag))
            trial_sequence(v, el.vl, depth, idx);
        return true;
    }

    /* Walk [v, v + len) as implicit VR items; keep them as node idx's children when they
     * parse, else leave idx a plain value and record nothing. Never fails the walk. */
    void trial_sequence(size_t v, uint32_t len, int depth, size_t idx)
    {
        const size_t mark = t_.nodes.size();
        const bool was = trial_;
        trial_ = true;
        size_t p = v;
        const bool ok = sequence(p, v + len, true, depth + 1, true);
        trial_ = was;
        if (ok) {
            t_.nodes[idx].kind = N_SEQ;
            t_.nodes[idx].len = 0;
        } else {
            t_.nodes.resize(mark);
        }
    }

    /* Items of a sequence; defined: the sequence ends at end, else at its delimiter. */
    bool sequence(size_t &pos, size_t end, bool defined, int depth, bool implicit)
    {
        if (depth > kMaxDepth)
            return bad(pos, "sequences nested too deep");
        for (;;) {
            if (defined && pos == end)
                return true;
            if (!fits(pos, 8, end))
                return false;
            const uint16_t g = u16(pos), e = u16(pos + 2);
            const uint32_t vl = u32(pos + 4);
            if (g == 0xFFFE && e == 0xE0DD) {
                if (defined)
                    return bad(pos, "sequence delimiter in a defined-length sequence");
                pos += 8;
                return true;
            }
            if (g != 0xFFFE || e != 0xE000)
                return bad(pos, "expected a sequence item");
            size_t idx;
            if (!open(idx, 0xFFFEE000u, 0, N_ITEM, implicit, pos + 8, 0, pos))
                return false;
            pos += 8;
            if (vl == kUndefined) {
                if (!dataset(pos, end, depth, implicit, false))
                    return false;
            } else {
                if (!fits(pos, vl, end))
                    return false;
                size_t item_end = pos + vl;
                if (!dataset(pos, item_end, depth, implicit, true))
                    return false;
            }
            close(idx);
        }
    }

    /* The data set of an item: up to end (defined) or its item delimiter. */
    bool dataset(size_t &pos, size_t end, int depth, bool implicit, bool defined)
    {
        for (;;) {
            if (defined && pos == end)
                return true;
            Elem el;
            if (!header(pos, end, implicit, el))
                return false;
            if (el.g == 0xFFFE) {
                if (el.e == 0xE00D) {
                    pos += 8;
                    if (!defined)
                        return true;
                    continue; /* GDCM skips a delimiter inside a defined-length item */
                }
                if (el.e == 0xE0DD && !defined && !implicit)
                    return true; /* item left open before the sequence end: GDCM accepts */
                return bad(pos, "unexpected delimiter in an item");
            }
            if (!element(pos, end, el, depth, implicit))
                return false;
        }
    }

    /* Encapsulated Pixel Data: the Basic Offset Table item, defined-length fragments, then the
     * sequence delimiter with a zero length (GDCM reads a delimiter's length as a value). */
    bool fragments(size_t &pos, size_t end, int depth)
    {
        if (depth > kMaxDepth)
            return bad(pos, "sequences nested too deep");
        for (bool first = true;; first = false) {
            if (!fits(pos, 8, end))
                return false;
            const uint16_t g = u16(pos), e = u16(pos + 2);
            const uint32_t vl = u32(pos + 4);
            if (g == 0xFFFE && e == 0xE0DD && vl == 0 && !first) {
                pos += 8;
                return true;
            }
            if (g != 0xFFFE || e != 0xE000 || vl == kUndefined)
                return bad(pos, "malformed pixel data fragment");
            pos += 8;
            if (!fits(pos, vl, end))
                return false;
            pos += vl;
        }
    }
};

uint16_t le16(const unsigned char *p)
{
    return uint16_t(p[1] << 8 | p[0]);
}
uint32_t le32(const unsigned char *p)
{
    return uint32_t(p[3]) << 24 | uint32_t(p[2]) << 16 | uint32_t(p[1]) << 8 | p[0];
}

std::string trimmed(const unsigned char *p, size_t n)
{
    while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\0'))
        n--;
    return std::string(reinterpret_cast<const char *>(p), n);
}

/* File meta information (group 0002) at pos, explicit or (as some old writers did) implicit
 * VR little endian; pos moves past it. */
bool read_meta(Input &in, size_t &pos, Scan &s, std::string &why)
{
    const size_t end = in.total();
    const bool explicit_vr = in.need(pos + 6) && known_vr(in.data() + pos + 4);
    bool have_ts = false;
    for (;;) {
        if (!in.need(std::min(pos + 4, end)) || end - pos < 4)
            break;
        if (le16(in.data() + pos) != 0x0002)
            break;
        const uint16_t e = le16(in.data() + pos + 2);
        size_t hdr;
        uint32_t vl;
        if (explicit_vr) {
            if (!in.need(pos + 8) || !known_vr(in.data() + pos + 4)) {
                why = strf("malformed file meta information at offset %zu", pos);
                return false;
            }
            bool lv = long_vr(in.data() + pos + 4);
            if (lv && !in.need(pos + 12)) {
                why = strf("truncated file meta information at offset %zu", pos);
                return false;
            }
            if (memcmp(in.data() + pos + 4, "SQ", 2) == 0) {
                why = strf("sequence in the file meta information at offset %zu", pos);
                return false;
            }
            hdr = lv ? 12 : 8;
            vl = lv ? le32(in.data() + pos + 8) : le16(in.data() + pos + 6);
        } else {
            if (!in.need(pos + 8)) {
                why = strf("truncated file meta information at offset %zu", pos);
                return false;
            }
            hdr = 8;
            vl = le32(in.data() + pos + 4);
        }
        if (vl == kUndefined || vl > end - pos - hdr || !in.need(pos + hdr + vl)) {
            why = strf("truncated file meta information at offset %zu", pos);
            return false;
        }
        const unsigned char *v = in.data() + pos + hdr;
        if (e == 0x0010) {
            s.ts_uid = trimmed(v, vl);
            have_ts = true;
        } else if (e == 0x0002) {
            s.meta_sop_class = trimmed(v, vl);
        }
        pos += hdr + vl;
    }
    if (!have_ts) {
        why = "file meta information has no TransferSyntaxUID";
        return false;
    }
    const gdcm::TransferSyntax ts(gdcm::TransferSyntax::GetTSType(s.ts_uid.c_str()));
    if (!ts.IsValid()) {
        why = strf("unsupported transfer syntax \"%.64s\"", s.ts_uid.c_str());
        return false;
    }
    if (ts == gdcm::TransferSyntax::DeflatedExplicitVRLittleEndian) {
        s.deflated = true;
        s.enc = Enc::ExplicitLE;
    } else if (ts.GetNegociatedType() == gdcm::TransferSyntax::Implicit) {
        if (ts.GetSwapCode() == gdcm::SwapCode::BigEndian) {
            why = "implicit VR big endian is not supported";
            return false;
        }
        s.enc = Enc::ImplicitLE;
    } else {
        s.enc = ts.GetSwapCode() == gdcm::SwapCode::BigEndian ? Enc::ExplicitBE : Enc::ExplicitLE;
    }
    return true;
}

/* Inflate a deflated data set (raw deflate, PS3.5 A.5) into s.inflated. */
bool inflate_dataset(const unsigned char *p, size_t n, Scan &s, std::string &why)
{
    z_stream z;
    memset(&z, 0, sizeof(z));
    if (inflateInit2(&z, -MAX_WBITS) != Z_OK) {
        why = "could not initialise zlib";
        return false;
    }
    z.next_in = const_cast<Bytef *>(p);
    z.avail_in = uInt(std::min(n, size_t(UINT32_MAX)));
    int rc = Z_OK;
    while (rc == Z_OK) {
        if (s.inflated.size() >= kMaxInflated) {
            rc = Z_MEM_ERROR;
            break;
        }
        size_t have = s.inflated.size();
        s.inflated.resize(have + 256 * 1024);
        z.next_out = reinterpret_cast<Bytef *>(&s.inflated[have]);
        z.avail_out = 256 * 1024;
        rc = inflate(&z, Z_NO_FLUSH);
        s.inflated.resize(s.inflated.size() - z.avail_out);
        if (rc == Z_BUF_ERROR && z.avail_in == 0)
            break; /* input ended without the final block */
    }
    inflateEnd(&z);
    if (rc != Z_STREAM_END) {
        why = rc == Z_MEM_ERROR ? "deflated data set is too large" : "corrupt deflated data set";
        return false;
    }
    return true;
}

} // namespace

lc_rc scan(Input &in, bool full, Scan &s, std::string &why)
{
    size_t pos = 0;
    if (in.need(132) && memcmp(in.data() + 128, "DICM", 4) == 0)
        pos = 132;
    if (!in.need(pos + 8)) {
        if (in.io_errno) {
            why = strerror(in.io_errno);
            return LC_ERR_IO;
        }
        why = in.total() == 0 ? "empty input" : "too short to be DICOM";
        return LC_ERR_DICOM;
    }
    const unsigned char *p = in.data() + pos;
    const uint16_t g = le16(p), e = le16(p + 2);
    if (g == 0x0002) {
        if (!read_meta(in, pos, s, why))
            return in.io_errno ? LC_ERR_IO : LC_ERR_DICOM;
    } else if (g == 0x0008) {
        s.enc = known_vr(p + 4) ? Enc::ExplicitLE : Enc::ImplicitLE;
    } else if (g == 0x0800) {
        if (!known_vr(p + 4)) {
            why = "implicit VR big endian (ACR-NEMA) is not supported";
            return LC_ERR_DICOM;
        }
        s.enc = Enc::ExplicitBE;
    } else if (e == 0x0010) {
        s.enc = Enc::ImplicitLE;
    } else if (known_vr(p + 4)) {
        s.enc = (g > 0xff || e > 0xff) ? Enc::ExplicitBE : Enc::ExplicitLE;
    } else {
        why = pos == 132 ? "no data set after the DICM prefix"
                         : "not DICOM (no DICM prefix, no recognisable data set)";
        return LC_ERR_DICOM;
    }
    s.ds_start = pos;
    if (s.deflated) {
        if (!in.need(in.total())) {
            why = in.io_errno ? strerror(in.io_errno) : "truncated data";
            return in.io_errno ? LC_ERR_IO : LC_ERR_DICOM;
        }
        if (!inflate_dataset(in.data() + pos, in.total() - pos, s, why))
            return LC_ERR_DICOM;
        Input inner(s.inflated.data(), s.inflated.size());
        Walker w(inner, false, s.tree);
        if (!w.top(0, full, s)) {
            why = "deflated data set: " + w.why;
            return LC_ERR_DICOM;
        }
        s.tree.base = reinterpret_cast<const unsigned char *>(s.inflated.data());
        s.tree.size = s.inflated.size();
        return LC_OK;
    }
    Walker w(in, s.enc == Enc::ExplicitBE, s.tree);
    if (!w.top(pos, full, s)) {
        why = w.why;
        return w.io_error ? LC_ERR_IO : LC_ERR_DICOM;
    }
    s.tree.base = in.data(); /* stable now: the walk loaded everything it recorded */
    s.tree.size = in.have();
    s.tree.big = s.enc == Enc::ExplicitBE;
    return LC_OK;
}

} // namespace lcdcm
