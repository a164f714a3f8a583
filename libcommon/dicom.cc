/*
 * dicom.cc: lc_dicom_* (lc/dicom.h) over GDCM 3: header parse that stops at Pixel Data, pixel
 * decode to float32 through GDCM's codecs, Specific Character Set decoding to UTF-8 (iconv), UID
 * syntax check. Debian's GDCM 3.0.21 keeps assert() and trusts lengths and codestreams, so every
 * input is first walked and checked here (Walker, *_ok) and GDCM only reads checked bytes.
 * Results are malloc'd and owned by the caller. Reentrant: each call has its own GDCM objects;
 * the only shared state is GDCM's read-only dictionaries and its trace switches, set once.
 * No C++ exception crosses the C boundary: every entry point catches all of them.
 */
#include <algorithm>
#include <cstdarg>
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
#include <iconv.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

/* GDCM's headers trip -Wdeprecated-copy under clang's -Wextra: not ours to fix */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-copy"
#ifdef __clang__
#pragma clang diagnostic ignored "-Wdeprecated-copy-with-user-provided-copy"
#endif
#include "gdcmDataSet.h"
#include "gdcmExplicitDataElement.h"
#include "gdcmFragment.h"
#include "gdcmBitmap.h"
#include "gdcmImplicitDataElement.h"
#include "gdcmItem.h"
#include "gdcmSequenceOfFragments.h"
#include "gdcmSequenceOfItems.h"
#include "gdcmSwapper.h"
#include "gdcmTrace.h"
#include "gdcmTransferSyntax.h"
#pragma GCC diagnostic pop

extern "C" {
#include "lc/dicom.h"
#include "lc/rc.h"
}

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

const gdcm::Tag kPixelData(0x7fe0, 0x0010);

std::string strf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
std::string strf(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    return buf;
}

/* ---- character sets ---------------------------------------------------------------------- */

const char kReplacement[] = "\xEF\xBF\xBD"; /* U+FFFD */

/* A code element of ISO 2022 as DICOM uses it (PS3.3 C.12.1.1.2, PS3.5 6.1.2.5). */
enum CodeSet {
    CS_NONE,     /* no G1 set: bytes >= 0x80 are invalid */
    CS_ASCII,    /* G0, ISO IR 6 (also used for JIS X 0201 Romaji, see decode_2022) */
    CS_KATAKANA, /* G1, JIS X 0201 Katakana (ISO IR 13) */
    CS_JIS0208,  /* G0, 2 bytes (ISO IR 87) */
    CS_JIS0212,  /* G0, 2 bytes (ISO IR 159) */
    CS_KSX1001,  /* G1, 2 bytes (ISO IR 149) */
    CS_GB2312,   /* G1, 2 bytes (ISO IR 58) */
    CS_LATIN1,   /* G1, ISO 8859-1 upper half, converted without iconv */
    CS_SB96,     /* G1, another ISO 8859 / TIS-620 upper half through iconv */
};

struct G1Set {
    CodeSet set;
    const char *iconv_name; /* CS_SB96 only */
};

/* Single-byte G1 sets, by ISO IR number and by the final byte of ESC - F. */
struct Sb96 {
    int ir;
    char final_byte;
    CodeSet set;
    const char *iconv_name;
};
const Sb96 kSb96[] = {
    {100, 'A', CS_LATIN1, nullptr},    {101, 'B', CS_SB96, "ISO-8859-2"},
    {109, 'C', CS_SB96, "ISO-8859-3"}, {110, 'D', CS_SB96, "ISO-8859-4"},
    {144, 'L', CS_SB96, "ISO-8859-5"}, {127, 'G', CS_SB96, "ISO-8859-6"},
    {126, 'F', CS_SB96, "ISO-8859-7"}, {138, 'H', CS_SB96, "ISO-8859-8"},
    {148, 'M', CS_SB96, "ISO-8859-9"}, {203, 'b', CS_SB96, "ISO-8859-15"},
    {166, 'T', CS_SB96, "TIS-620"},
};

/* The parsed Specific Character Set: a whole-value encoding, or the ISO 2022 defaults. */
struct Charset {
    const char *whole = nullptr; /* "UTF-8", "GB18030", "GBK": the value is converted at once */
    CodeSet g0 = CS_ASCII;       /* initial and reset state of the 2022 decoder */
    G1Set g1 = {CS_NONE, nullptr};
};

void put_utf8(std::string &out, uint32_t cp)
{
    if (cp < 0x80) {
        out += char(cp);
    } else if (cp < 0x800) {
        out += char(0xC0 | (cp >> 6));
        out += char(0x80 | (cp & 0x3F));
    } else {
        out += char(0xE0 | (cp >> 12));
        out += char(0x80 | ((cp >> 6) & 0x3F));
        out += char(0x80 | (cp & 0x3F));
    }
}

/* Convert n bytes in charset name to UTF-8, appending; invalid input becomes U+FFFD. */
void iconv_append(std::string &out, const char *name, const char *p, size_t n)
{
    if (n == 0)
        return;
    iconv_t cd = iconv_open("UTF-8", name);
    if (cd == (iconv_t)-1) {
        for (size_t i = 0; i < n; i++) {
            if ((unsigned char)p[i] < 0x80)
                out += p[i];
            else
                out += kReplacement;
        }
        return;
    }
    char buf[512];
    char *in = const_cast<char *>(p);
    size_t inleft = n;
    while (inleft > 0) {
        char *o = buf;
        size_t oleft = sizeof(buf);
        size_t r = iconv(cd, &in, &inleft, &o, &oleft);
        out.append(buf, size_t(o - buf));
        if (r == (size_t)-1) {
            if (errno == E2BIG)
                continue;
            /* EILSEQ: skip one byte; EINVAL: an incomplete sequence at the end */
            out += kReplacement;
            if (errno == EINVAL) {
                break;
            }
            in++;
            inleft--;
            iconv(cd, nullptr, nullptr, nullptr, nullptr);
        }
    }
    iconv_close(cd);
}

bool all_ascii(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)p[i] >= 0x80)
            return false;
    return true;
}

/* One defined term ("ISO_IR 100", "ISO 2022 IR 87", "GB18030") into the charset; returns
 * false for unknown terms (which then leave the default repertoire in place). */
bool apply_term(Charset &cs, const std::string &t, bool first)
{
    if (t == "ISO_IR 192") {
        cs.whole = "UTF-8";
        return true;
    }
    if (t == "GB18030" || t == "GBK") {
        cs.whole = t == "GBK" ? "GBK" : "GB18030";
        return true;
    }
    int ir = -1;
    if (t.compare(0, 7, "ISO_IR ") == 0)
        ir = atoi(t.c_str() + 7);
    else if (t.compare(0, 12, "ISO 2022 IR ") == 0)
        ir = atoi(t.c_str() + 12);
    if (ir < 0)
        return false;
    if (ir == 6)
        return true;
    if (ir == 13) {
        /* JIS X 0201: Romaji in G0 (read as ASCII), half-width Katakana in G1 */
        if (first)
            cs.g1 = {CS_KATAKANA, nullptr};
        return true;
    }
    for (const Sb96 &s : kSb96) {
        if (s.ir == ir) {
            if (first)
                cs.g1 = {s.set, s.iconv_name};
            return true;
        }
    }
    /* 87, 159, 149, 58: only reachable through escape sequences, nothing to set up */
    return ir == 87 || ir == 159 || ir == 149 || ir == 58;
}

Charset parse_charset(const char *spec)
{
    Charset cs;
    if (!spec)
        return cs;
    const char *p = spec;
    bool first = true;
    for (;;) {
        const char *e = strchr(p, '\\');
        size_t n = e ? size_t(e - p) : strlen(p);
        while (n > 0 && (*p == ' '))
            p++, n--;
        while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\0'))
            n--;
        apply_term(cs, std::string(p, n), first);
        if (cs.whole)
            return cs; /* UTF-8 and GB18030 do not combine with code extensions */
        first = false;
        if (!e)
            break;
        p = e + 1;
    }
    return cs;
}

/* Collects bytes that share one iconv decoder so that runs convert in one call. */
struct Run {
    std::string &out;
    const char *name = nullptr;
    std::string bytes;
    explicit Run(std::string &o) : out(o)
    {
    }
    void add(const char *iconv_name, const char *p, size_t n)
    {
        if (name != iconv_name && !bytes.empty())
            flush();
        name = iconv_name;
        bytes.append(p, n);
    }
    void flush()
    {
        if (!bytes.empty())
            iconv_append(out, name, bytes.data(), bytes.size());
        bytes.clear();
    }
};

/* Recognise an escape sequence at p (p[0] == ESC); returns its length, 0 if unknown. */
size_t parse_escape(const unsigned char *p, size_t n, CodeSet &g0, G1Set &g1)
{
    if (n >= 3 && p[1] == '(' && (p[2] == 'B' || p[2] == 'J')) {
        g0 = CS_ASCII; /* ISO IR 6, or JIS X 0201 Romaji read as ASCII */
        return 3;
    }
    if (n >= 3 && p[1] == ')' && p[2] == 'I') {
        g1 = {CS_KATAKANA, nullptr};
        return 3;
    }
    if (n >= 3 && p[1] == '$' && (p[2] == 'B' || p[2] == '@')) {
        g0 = CS_JIS0208;
        return 3;
    }
    if (n >= 4 && p[1] == '$' && p[2] == '(' && p[3] == 'D') {
        g0 = CS_JIS0212;
        return 4;
    }
    if (n >= 4 && p[1] == '$' && p[2] == ')' && (p[3] == 'C' || p[3] == 'A')) {
        g1 = {p[3] == 'C' ? CS_KSX1001 : CS_GB2312, nullptr};
        return 4;
    }
    if (n >= 3 && p[1] == '-') {
        for (const Sb96 &s : kSb96) {
            if (s.final_byte == (char)p[2]) {
                g1 = {s.set, s.iconv_name};
                return 3;
            }
        }
    }
    return 0;
}

/* ISO 2022 decoding as PS3.5 6.1.2.5 describes: G0 in GL, G1 in GR, escape sequences switch
 * sets, and the first value's sets become active again at control characters, at the value
 * delimiter '\' and, for person names, at the '^' and '=' component delimiters. Delimiters
 * are only recognised in single-byte G0 state: in a 2-byte GL set (JIS X 0208) 0x5C and 0x5E
 * are halves of characters. JIS X 0201 Romaji is read as ASCII: its 0x5C must stay the DICOM
 * value delimiter rather than a yen sign. */
void decode_2022(std::string &out, const Charset &cs, const unsigned char *p, size_t n, bool pn)
{
    CodeSet g0 = cs.g0;
    G1Set g1 = cs.g1;
    Run run(out);
    size_t i = 0;
    while (i < n) {
        unsigned char b = p[i];
        if (b == 0x1B) {
            run.flush();
            size_t k = parse_escape(p + i, n - i, g0, g1);
            if (k == 0) {
                out += kReplacement;
                k = 1;
            }
            i += k;
            continue;
        }
        if (b < 0x80) {
            bool two = (g0 == CS_JIS0208 || g0 == CS_JIS0212) && b >= 0x21 && b <= 0x7E;
            if (two) {
                if (i + 1 < n && p[i + 1] >= 0x21 && p[i + 1] <= 0x7E) {
                    char pair[3];
                    size_t k = 0;
                    if (g0 == CS_JIS0212)
                        pair[k++] = char(0x8F);
                    pair[k++] = char(b | 0x80);
                    pair[k++] = char(p[i + 1] | 0x80);
                    run.add("EUC-JP", pair, k);
                    i += 2;
                } else {
                    run.flush();
                    out += kReplacement;
                    i++;
                }
                continue;
            }
            run.flush();
            out += char(b);
            i++;
            bool reset = b < 0x20 || b == '\\' || (pn && (b == '^' || b == '='));
            if (reset) {
                g0 = cs.g0;
                g1 = cs.g1;
            }
            continue;
        }
        /* GR: the G1 set */
        switch (g1.set) {
        case CS_LATIN1:
            run.flush();
            put_utf8(out, b);
            i++;
            break;
        case CS_KATAKANA:
            run.flush();
            if (b >= 0xA1 && b <= 0xDF)
                put_utf8(out, 0xFF61 + (b - 0xA1));
            else
                out += kReplacement;
            i++;
            break;
        case CS_SB96:
            run.add(g1.iconv_name, (const char *)p + i, 1);
            i++;
            break;
        case CS_KSX1001:
        case CS_GB2312:
            if (b >= 0xA1 && b <= 0xFE && i + 1 < n && p[i + 1] >= 0xA1 && p[i + 1] <= 0xFE) {
                run.add(g1.set == CS_KSX1001 ? "EUC-KR" : "GB2312", (const char *)p + i, 2);
                i += 2;
            } else {
                run.flush();
                out += kReplacement;
                i++;
            }
            break;
        default:
            run.flush();
            out += kReplacement;
            i++;
            break;
        }
    }
    run.flush();
}

/* bytes in charset (parsed) to UTF-8; pn selects the person-name delimiter resets. */
void to_utf8(std::string &out, const Charset &cs, const char *p, size_t n, bool pn)
{
    out.clear();
    if (all_ascii(p, n) && (cs.whole || !memchr(p, 0x1B, n))) {
        out.assign(p, n);
        return;
    }
    if (cs.whole)
        iconv_append(out, cs.whole, p, n);
    else
        decode_2022(out, cs, (const unsigned char *)p, n, pn);
}

/* ---- input and structural pre-scan ------------------------------------------------------- */

/* The bytes being parsed: borrowed memory, or a file read on demand so that a header parse
 * reads little more than the part before Pixel Data. */
class Input
{
  public:
    Input(const void *p, size_t n)
        : mem_(static_cast<const unsigned char *>(p)), have_(n), total_(n)
    {
    }
    Input(int fd, size_t total) : fd_(fd), total_(total)
    {
    }
    Input(const Input &) = delete;
    Input &operator=(const Input &) = delete;

    size_t total() const
    {
        return total_;
    }
    const unsigned char *data() const
    {
        return fd_ >= 0 ? reinterpret_cast<const unsigned char *>(buf_.data()) : mem_;
    }
    /* Make bytes [0, end) available; false past the end of the input or on a read error
     * (io_errno then says which). */
    bool need(size_t end)
    {
        if (end <= have_)
            return true;
        if (fd_ < 0 || end > total_)
            return false;
        size_t want = std::min(total_, std::max({end, have_ * 2, size_t(64 * 1024)}));
        buf_.resize(want);
        while (have_ < want) {
            ssize_t r = read(fd_, buf_.data() + have_, want - have_);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0) {
                io_errno = errno;
                return false;
            }
            if (r == 0) { /* the file shrank under us: what we have is all there is */
                total_ = have_;
                return end <= have_;
            }
            have_ += size_t(r);
        }
        return true;
    }
    int io_errno = 0;

  private:
    const unsigned char *mem_ = nullptr;
    int fd_ = -1;
    std::vector<char> buf_;
    size_t have_ = 0;
    size_t total_;
};

enum class Enc { ImplicitLE, ExplicitLE, ExplicitBE };

/* What the pre-scan learnt. Offsets are into the input, or into inflated when deflated. */
struct Scan {
    Enc enc = Enc::ExplicitLE;
    bool deflated = false;
    std::string inflated; /* the inflated data set of a deflated file */
    size_t ds_start = 0;  /* where the data set starts */
    size_t stop = 0;      /* GDCM may read [ds_start, stop): everything that was checked */
    bool has_pixel_data = false;
    std::string ts_uid; /* (0002,0010), "" without file meta information */
    std::string meta_sop_class;
};

const uint32_t kUndefined = 0xFFFFFFFFu;
const int kMaxDepth = 64; /* sequence nesting; real objects stay below 10 */
const size_t kMaxInflated = size_t(512) << 20;

bool known_vr(const unsigned char *v)
{
    static const char vrs[] =
        "AEASATCSDADSDTFDFLISLOLTOBODOFOLOVOWPNSHSLSQSSSTSVTMUCUIULUNURUSUTUV";
    for (size_t i = 0; i + 1 < sizeof(vrs); i += 2)
        if (v[0] == (unsigned char)vrs[i] && v[1] == (unsigned char)vrs[i + 1])
            return true;
    return false;
}

bool long_vr(const unsigned char *v)
{
    static const char vrs[] = "OBODOFOLOVOWSQSVUCUNURUTUV";
    for (size_t i = 0; i + 1 < sizeof(vrs); i += 2)
        if (v[0] == (unsigned char)vrs[i] && v[1] == (unsigned char)vrs[i + 1])
            return true;
    return false;
}

/*
 * A bounds-checking walk over the element structure, run before GDCM sees any byte.
 * Why: Debian builds GDCM with assert() enabled, and its readers assert (abort the process)
 * on truncated or inconsistent input, or allocate whatever length a header claims. The walk
 * accepts the subset of encodings GDCM's plain readers handle: every length must fit, every
 * undefined-length sequence and item must be closed, nesting is bounded. GDCM then reads
 * exactly the bytes that were checked, with the transfer syntax found here.
 */
class Walker
{
  public:
    Walker(Input &in, bool big) : in_(in), big_(big)
    {
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
            if (!value(pos, end, el, 0, s.enc == Enc::ImplicitLE))
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

    /* The value of el at pos; pos moves past it. */
    bool value(size_t &pos, size_t end, const Elem &el, int depth, bool implicit)
    {
        const bool pixel = el.g == 0x7FE0 && el.e == 0x0010;
        size_t v = pos + el.hdr;
        if (pixel && is_vr(el, "SQ"))
            return bad(pos, "Pixel Data encoded as a sequence");
        if (el.vl == kUndefined) {
            if (pixel) {
                if (!implicit && !is_vr(el, "OB") && !is_vr(el, "OW") && !is_vr(el, "UN"))
                    return bad(pos, "undefined length Pixel Data with a wrong VR");
                pos = v;
                return fragments(pos, end, depth + 1);
            }
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
            pos = v;
            return sequence(pos, v + el.vl, true, depth + 1, false);
        }
        pos = v + el.vl;
        return true;
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
            if (!value(pos, end, el, depth, implicit))
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

/*
 * Find the transfer syntax the way GDCM's Reader does (preamble, file meta information, or
 * a guess from the first element of a bare data set) and check the structure. full: walk the
 * whole input (pixel decode), else stop at Pixel Data. Returns LC_OK, LC_ERR_DICOM or
 * LC_ERR_IO with why set.
 */
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
        Walker w(inner, false);
        if (!w.top(0, full, s)) {
            why = "deflated data set: " + w.why;
            return LC_ERR_DICOM;
        }
        return LC_OK;
    }
    Walker w(in, s.enc == Enc::ExplicitBE);
    if (!w.top(pos, full, s)) {
        why = w.why;
        return w.io_error ? LC_ERR_IO : LC_ERR_DICOM;
    }
    return LC_OK;
}

/* ---- value access ------------------------------------------------------------------------ */

/* The element with tag t at the top level of ds, or nullptr. */
const gdcm::DataElement *find(const gdcm::DataSet &ds, uint16_t g, uint16_t e)
{
    const gdcm::Tag t(g, e);
    const gdcm::DataElement &de = ds.GetDataElement(t);
    return de.GetTag() == t ? &de : nullptr;
}

/* The raw bytes of an element's value; false when absent, a sequence or empty. */
bool raw_value(const gdcm::DataElement *de, const char **p, size_t *n)
{
    if (!de)
        return false;
    const gdcm::ByteValue *bv = de->GetByteValue();
    if (!bv || !bv->GetPointer() || bv->GetLength() == 0)
        return false;
    *p = bv->GetPointer();
    *n = bv->GetLength();
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

/* First item of sequence (g,e) in ds, or nullptr. Only real sequences: an undecoded UN value
 * is not re-parsed (that is where malformed input would hurt). */
const gdcm::DataSet *first_item(const gdcm::DataSet &ds, uint16_t g, uint16_t e)
{
    const gdcm::DataElement *de = find(ds, g, e);
    if (!de)
        return nullptr;
    if (de->IsEmpty() || de->GetByteValue())
        return nullptr;
    const gdcm::SequenceOfItems *sq = dynamic_cast<const gdcm::SequenceOfItems *>(&de->GetValue());
    if (!sq || sq->GetNumberOfItems() < 1)
        return nullptr;
    return &sq->GetItem(1).GetNestedDataSet();
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

/* Per-parse state of value access: the data set, whether it is big endian (GDCM leaves VR UN
 * values in the file's byte order), its character set, a scratch string. */
struct Ctx {
    const gdcm::DataSet &ds;
    bool big_endian;
    Charset cs;
    std::string tmp;
};

bool get_us(const Ctx &c, const gdcm::DataSet &ds, uint16_t g, uint16_t e, int *out)
{
    const gdcm::DataElement *de = find(ds, g, e);
    const char *p;
    size_t n;
    if (!raw_value(de, &p, &n))
        return false;
    const gdcm::VR vr = de->GetVR();
    if (vr != gdcm::VR::INVALID && vr != gdcm::VR::UN && (vr & gdcm::VR::VRASCII)) {
        long v;
        if (!parse_int(p, n, 0, 65535, &v))
            return false;
        *out = int(v);
        return true;
    }
    if (n < 2)
        return false;
    /* GDCM swaps binary values of a known VR to host order while reading; an implicit VR
     * dataset is little endian; only UN in a big endian dataset keeps the file's order */
    unsigned char b0 = (unsigned char)p[0], b1 = (unsigned char)p[1];
    if (vr == gdcm::VR::UN && c.big_endian)
        *out = (b0 << 8) | b1;
    else {
        uint16_t v;
        memcpy(&v, p, 2);
        *out = v;
    }
    return true;
}

bool get_is(const gdcm::DataSet &ds, uint16_t g, uint16_t e, int *out)
{
    const char *p;
    size_t n;
    long v;
    if (!raw_value(find(ds, g, e), &p, &n) || !parse_int(p, n, -2147483647L, 2147483647L, &v))
        return false;
    *out = int(v);
    return true;
}

bool get_ds(const gdcm::DataSet &ds, uint16_t g, uint16_t e, double *out, int count)
{
    const char *p;
    size_t n;
    if (!raw_value(find(ds, g, e), &p, &n))
        return false;
    double tmp[6];
    if (!parse_ds(p, n, tmp, count))
        return false;
    memcpy(out, tmp, sizeof(double) * size_t(count));
    return true;
}

/* How a string value is decoded: ASCII VRs (UI, CS, DA, TM) get the default repertoire, text
 * VRs (LO, SH) the Specific Character Set, PN also its component delimiters. */
enum StrKind { K_ASCII, K_TEXT, K_PN };

/* A malloc'd UTF-8 copy of a string element; *oom set on allocation failure. */
char *get_str(Ctx &c, uint16_t g, uint16_t e, StrKind kind, bool *oom)
{
    const char *p;
    size_t n;
    if (!raw_value(find(c.ds, g, e), &p, &n))
        return nullptr;
    trim(&p, &n);
    if (kind == K_ASCII) {
        static const Charset ascii;
        to_utf8(c.tmp, ascii, p, n, false);
    } else {
        to_utf8(c.tmp, c.cs, p, n, kind == K_PN);
    }
    char *s = (char *)malloc(c.tmp.size() + 1);
    if (!s) {
        *oom = true;
        return nullptr;
    }
    memcpy(s, c.tmp.data(), c.tmp.size());
    s[c.tmp.size()] = '\0';
    return s;
}

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
    uint16_t g, e;
    size_t off;
    StrKind kind;
};
#define F(g, e, field, kind)                                                                       \
    {                                                                                              \
        g, e, offsetof(lc_dicom_header, field), kind                                               \
    }
const StrField kStrFields[] = {
    F(0x0010, 0x0010, patient_name, K_PN),
    F(0x0010, 0x0020, patient_id, K_TEXT),
    F(0x0010, 0x0030, patient_birth_date, K_ASCII),
    F(0x0010, 0x0040, patient_sex, K_ASCII),
    F(0x0008, 0x0020, study_date, K_ASCII),
    F(0x0008, 0x0030, study_time, K_ASCII),
    F(0x0008, 0x0050, accession_number, K_TEXT),
    F(0x0020, 0x0010, study_id, K_TEXT),
    F(0x0008, 0x1030, study_description, K_TEXT),
    F(0x0008, 0x0090, referring_physician_name, K_PN),
    F(0x0008, 0x0060, modality, K_ASCII),
    F(0x0008, 0x103E, series_description, K_TEXT),
    F(0x0018, 0x0015, body_part_examined, K_ASCII),
    F(0x0028, 0x0004, photometric_interpretation, K_ASCII),
};
#undef F

/* Geometry, with the Enhanced (multi-frame) functional groups as fallback: shared groups
 * for orientation, spacing and rescale, the first frame's group for the position. */
void fill_geometry(const Ctx &c, lc_dicom_header *h)
{
    const gdcm::DataSet &ds = c.ds;
    const gdcm::DataSet *shared = first_item(ds, 0x5200, 0x9229);
    const gdcm::DataSet *frame1 = first_item(ds, 0x5200, 0x9230);
    auto fg = [&](uint16_t sg, uint16_t se, uint16_t g, uint16_t e, double *out, int count) {
        for (const gdcm::DataSet *grp : {shared, frame1}) {
            const gdcm::DataSet *it = grp ? first_item(*grp, sg, se) : nullptr;
            if (it && get_ds(*it, g, e, out, count))
                return true;
        }
        return false;
    };
    h->has_ipp =
        get_ds(ds, 0x0020, 0x0032, h->ipp, 3) || fg(0x0020, 0x9113, 0x0020, 0x0032, h->ipp, 3);
    h->has_iop =
        get_ds(ds, 0x0020, 0x0037, h->iop, 6) || fg(0x0020, 0x9116, 0x0020, 0x0037, h->iop, 6);
    h->has_pixel_spacing = get_ds(ds, 0x0028, 0x0030, h->pixel_spacing, 2) ||
                           fg(0x0028, 0x9110, 0x0028, 0x0030, h->pixel_spacing, 2);
    h->has_slice_thickness = get_ds(ds, 0x0018, 0x0050, &h->slice_thickness, 1) ||
                             fg(0x0028, 0x9110, 0x0018, 0x0050, &h->slice_thickness, 1);
    double v;
    h->rescale_slope = 1.0;
    h->rescale_intercept = 0.0;
    if (get_ds(ds, 0x0028, 0x1053, &v, 1) || fg(0x0028, 0x9145, 0x0028, 0x1053, &v, 1))
        if (v != 0.0)
            h->rescale_slope = v;
    if (get_ds(ds, 0x0028, 0x1052, &v, 1) || fg(0x0028, 0x9145, 0x0028, 0x1052, &v, 1))
        h->rescale_intercept = v;
}

/* Fill h from a parsed data set; LC_ERR_DICOM when an identity UID is missing or bad. */
lc_rc fill_header(const gdcm::DataSet &ds, const Scan &s, lc_dicom_header *h, lc_err *err)
{
    Ctx c{ds, s.enc == Enc::ExplicitBE, Charset(), std::string()};
    bool oom = false;

    /* Specific Character Set first: every text value depends on it */
    h->specific_character_set = get_str(c, 0x0008, 0x0005, K_ASCII, &oom);
    if (!h->specific_character_set && !oom)
        h->specific_character_set = dup_str("", 0, &oom);
    if (oom)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    c.cs = parse_charset(h->specific_character_set);

    struct {
        char **dst;
        uint16_t g, e;
        const char *what;
    } uids[] = {
        {&h->study_instance_uid, 0x0020, 0x000D, "StudyInstanceUID"},
        {&h->series_instance_uid, 0x0020, 0x000E, "SeriesInstanceUID"},
        {&h->sop_instance_uid, 0x0008, 0x0018, "SOPInstanceUID"},
    };
    for (auto &u : uids) {
        *u.dst = get_str(c, u.g, u.e, K_ASCII, &oom);
        if (oom)
            return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        if (!*u.dst || !**u.dst)
            return lc_err_set(err, LC_ERR_DICOM, "%s is missing", u.what);
        if (!uid_chars_ok(*u.dst))
            return lc_err_set(err, LC_ERR_DICOM, "%s \"%.64s\" is not a UID", u.what, *u.dst);
    }
    h->sop_class_uid = get_str(c, 0x0008, 0x0016, K_ASCII, &oom);
    if (!h->sop_class_uid && !oom)
        h->sop_class_uid = dup_str(s.meta_sop_class.data(), s.meta_sop_class.size(), &oom);
    h->transfer_syntax_uid = dup_str(s.ts_uid.data(), s.ts_uid.size(), &oom);
    for (const StrField &sf : kStrFields)
        *(char **)((char *)h + sf.off) = get_str(c, sf.g, sf.e, sf.kind, &oom);
    if (oom)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");

    get_is(ds, 0x0020, 0x0011, &h->series_number);
    get_is(ds, 0x0020, 0x0013, &h->instance_number);
    get_is(ds, 0x0020, 0x1002, &h->images_in_acquisition);
    get_is(ds, 0x0020, 0x0105, &h->number_of_temporal_positions);
    get_us(c, ds, 0x0028, 0x0010, &h->rows);
    get_us(c, ds, 0x0028, 0x0011, &h->columns);
    get_us(c, ds, 0x0028, 0x0002, &h->samples_per_pixel);
    get_us(c, ds, 0x0028, 0x0100, &h->bits_allocated);
    get_us(c, ds, 0x0028, 0x0101, &h->bits_stored);
    get_us(c, ds, 0x0028, 0x0103, &h->pixel_representation);
    if (!get_is(ds, 0x0028, 0x0008, &h->number_of_frames) || h->number_of_frames < 0)
        h->number_of_frames = 0;
    if (h->number_of_frames == 0 && h->rows > 0)
        h->number_of_frames = 1;
    fill_geometry(c, h);
    h->has_pixel_data = s.has_pixel_data;
    return LC_OK;
}

/* GDCM reads the checked part of the data set with the scanned syntax: up to Pixel Data (its
 * value is never read), or everything when full (pixel decode). */
void gdcm_read(const Scan &s, const unsigned char *input, bool full, gdcm::DataSet &ds)
{
    const unsigned char *p = s.deflated ? reinterpret_cast<const unsigned char *>(s.inflated.data())
                                        : input + s.ds_start;
    const size_t n = s.deflated ? s.stop : s.stop - s.ds_start;
    MemBuf mb(p, n);
    std::istream is(&mb);
    const std::set<gdcm::Tag> skip{kPixelData};
    switch (s.enc) {
    case Enc::ImplicitLE:
        if (full)
            ds.Read<gdcm::ImplicitDataElement, gdcm::SwapperNoOp>(is);
        else
            ds.ReadUpToTag<gdcm::ImplicitDataElement, gdcm::SwapperNoOp>(is, kPixelData, skip);
        break;
    case Enc::ExplicitLE:
        if (full)
            ds.Read<gdcm::ExplicitDataElement, gdcm::SwapperNoOp>(is);
        else
            ds.ReadUpToTag<gdcm::ExplicitDataElement, gdcm::SwapperNoOp>(is, kPixelData, skip);
        break;
    case Enc::ExplicitBE:
        if (full)
            ds.Read<gdcm::ExplicitDataElement, gdcm::SwapperDoOp>(is);
        else
            ds.ReadUpToTag<gdcm::ExplicitDataElement, gdcm::SwapperDoOp>(is, kPixelData, skip);
        break;
    }
}

/* Scan in, parse it with GDCM into ds (up to Pixel Data, or all of it when full) and fill a new
 * header. */
lc_rc read_header(Input &in, bool full, const char *what, Scan &s, gdcm::DataSet &ds,
                  lc_dicom_header **out, lc_err *err)
{
    gdcm_quiet();
    std::string why;
    lc_rc rc = scan(in, full, s, why);
    if (rc != LC_OK)
        return lc_err_set(err, rc, "could not parse %s: %s", what, why.c_str());
    try {
        gdcm_read(s, in.data(), full, ds);
    } catch (const std::bad_alloc &) {
        throw;
    } catch (const std::exception &e) {
        return lc_err_set(err, LC_ERR_DICOM, "could not parse %s: %s", what, e.what());
    }
    lc_dicom_header *h = (lc_dicom_header *)calloc(1, sizeof(*h));
    if (!h)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    rc = fill_header(ds, s, h, err);
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

} // namespace

/* ---- C API: headers ---------------------------------------------------------------------- */

lc_rc lc_dicom_read_header(const char *path, lc_dicom_header **out, lc_err *err)
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
        gdcm::DataSet ds;
        std::string what = std::string("\"") + path + "\"";
        rc = read_header(in, false, what.c_str(), s, ds, out, err);
    } catch (const std::bad_alloc &) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory reading \"%s\"", path);
    } catch (const std::exception &e) {
        rc = lc_err_set(err, LC_ERR_DICOM, "could not parse \"%s\": %s", path, e.what());
    } catch (...) {
        rc = lc_err_set(err, LC_ERR_DICOM, "could not parse \"%s\": unknown error", path);
    }
    close(fd);
    return rc;
}

lc_rc lc_dicom_read_header_buf(const void *buf, size_t len, lc_dicom_header **out, lc_err *err)
{
    *out = nullptr;
    if (!buf)
        len = 0;
    try {
        Input in(buf, len);
        Scan s;
        gdcm::DataSet ds;
        return read_header(in, false, "DICOM buffer", s, ds, out, err);
    } catch (const std::bad_alloc &) {
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory reading DICOM buffer");
    } catch (const std::exception &e) {
        return lc_err_set(err, LC_ERR_DICOM, "could not parse DICOM buffer: %s", e.what());
    } catch (...) {
        return lc_err_set(err, LC_ERR_DICOM, "could not parse DICOM buffer: unknown error");
    }
}

void lc_dicom_header_free(lc_dicom_header *h)
{
    if (!h)
        return;
    char **strs[] = {&h->sop_class_uid,       &h->sop_instance_uid,    &h->study_instance_uid,
                     &h->series_instance_uid, &h->transfer_syntax_uid, &h->specific_character_set};
    for (char **s : strs)
        free(*s);
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
    gdcm::DataSet ds;
    lc_dicom_header *h = nullptr;
    std::string what = std::string("\"") + path + "\"";
    lc_rc rc = read_header(in, true, what.c_str(), s, ds, &h, err);
    if (rc != LC_OK)
        return rc;
    const int r = h->rows, c = h->columns, nf = h->number_of_frames, alloc = h->bits_allocated;
    const double slope = h->rescale_slope, intercept = h->rescale_intercept;
    const std::string pi = h->photometric_interpretation ? h->photometric_interpretation : "";
    const int spp = h->samples_per_pixel ? h->samples_per_pixel : 1;
    int stored = h->bits_stored, high = -1, pixrep = h->pixel_representation;
    lc_dicom_header_free(h);
    Ctx ctx{ds, false, Charset(), std::string()};
    get_us(ctx, ds, 0x0028, 0x0102, &high);

    const gdcm::DataElement *pd = find(ds, 0x7FE0, 0x0010);
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
            to_utf8(s, parse_charset(charset), bytes, len, true);
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
