/*
 * dicom_internal.h (C++ only): what the lc_dicom C++ files share (namespace lcdcm, never seen
 * by C): Specific Character Set decoding (dicom_charset.cc), the checked element tree that the
 * structural walk builds (dicom_walk.cc), the data dictionary (dicom_dict.cc) and the DICOM
 * JSON writer (dicom_json.cc). Everything is reentrant; the dictionary tables are built once
 * and read-only afterwards.
 */
#ifndef LC_DICOM_INTERNAL_H
#define LC_DICOM_INTERNAL_H

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#include <unistd.h>

#include "lc/rc.h"

namespace lcdcm
{

std::string strf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- character sets (dicom_charset.cc) ---------------------------------------------------- */

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

/* The parsed Specific Character Set: a whole-value encoding, or the ISO 2022 defaults. */
struct Charset {
    const char *whole = nullptr; /* "UTF-8", "GB18030", "GBK": the value is converted at once */
    CodeSet g0 = CS_ASCII;       /* initial and reset state of the 2022 decoder */
    G1Set g1 = {CS_NONE, nullptr};
};

/* The value of (0008,0005) (backslash-separated defined terms, may be NULL) parsed. */
Charset parse_charset(const char *spec);
/* Bytes in charset to UTF-8 into out (replaced); pn selects the person-name delimiter resets.
 * The result is always valid UTF-8 (invalid input becomes U+FFFD). */
void to_utf8(std::string &out, const Charset &cs, const char *p, size_t n, bool pn);

/* ---- the element tree (dicom_walk.cc) ----------------------------------------------------- */

/* A VR as its two characters packed big-endian-wise ("OB" -> 'O' << 8 | 'B'); 0 = unknown. */
constexpr uint16_t vr2(char a, char b)
{
    return uint16_t(uint16_t(uint8_t(a)) << 8 | uint8_t(b));
}

enum NodeKind : uint8_t {
    N_VALUE, /* an element with a defined-length value: [off, off + len) */
    N_SEQ,   /* a sequence (SQ, an undefined-length element, or a UN/implicit value that parsed
                as items): its children are N_ITEM nodes */
    N_ITEM,  /* an item of a sequence: its children are the item's elements */
    N_FRAGS, /* encapsulated pixel data: fragments are checked but not recorded */
};

/* One node of the tree, in depth-first order; the descendants of node i are [i + 1, end). */
struct Node {
    uint32_t tag;  /* group << 16 | element; 0xFFFEE000 for items */
    uint16_t vr;   /* the explicit VR as vr2(), or 0 when the data set is implicit */
    uint8_t kind;  /* NodeKind */
    uint8_t flags; /* N_IMPLICIT: the node's data set is implicit VR (also UN content) */
    uint32_t end;
    uint32_t len; /* value length (N_VALUE); 0 otherwise */
    size_t off;   /* offset of the value in Tree::base */
};
enum : uint8_t { N_IMPLICIT = 1 };

/* The structure of a checked data set: every node lies inside base[0, size). */
struct Tree {
    const unsigned char *base = nullptr;
    size_t size = 0;
    bool big = false; /* explicit VR big endian */
    std::vector<Node> nodes;
};

/* Children of node `parent` (or of the top level when parent == SIZE_MAX): call fn(index). */
template <typename F> void each_child(const Tree &t, size_t parent, F fn)
{
    size_t i = parent == SIZE_MAX ? 0 : parent + 1;
    const size_t end = parent == SIZE_MAX ? t.nodes.size() : t.nodes[parent].end;
    while (i < end) {
        fn(i);
        i = t.nodes[i].end;
    }
}

/* ---- input and the structural walk (dicom_walk.cc) --------------------------------------- */

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
    ~Input()
    {
        free(buf_);
    }
    Input(const Input &) = delete;
    Input &operator=(const Input &) = delete;

    size_t total() const
    {
        return total_;
    }
    /* how many bytes from the start are loaded */
    size_t have() const
    {
        return have_;
    }
    const unsigned char *data() const
    {
        return fd_ >= 0 ? reinterpret_cast<const unsigned char *>(buf_) : mem_;
    }
    /* Make bytes [0, end) available; false past the end of the input or on a read error
     * (io_errno then says which). A file is read in growing chunks from 16 KiB: most headers
     * fit in the first. */
    bool need(size_t end)
    {
        if (end <= have_)
            return true;
        if (fd_ < 0 || end > total_)
            return false;
        size_t want = std::min(total_, std::max({end, have_ * 2, size_t(16 * 1024)}));
        if (want > cap_) {
            char *nb = static_cast<char *>(realloc(buf_, want));
            if (!nb)
                throw std::bad_alloc();
            buf_ = nb;
            cap_ = want;
        }
        while (have_ < want) {
            ssize_t r = read(fd_, buf_ + have_, want - have_);
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
    char *buf_ = nullptr; /* malloc'd, cap_ bytes (not zeroed: only [0, have_) is read) */
    size_t cap_ = 0;
    size_t have_ = 0;
    size_t total_;
};

enum class Enc { ImplicitLE, ExplicitLE, ExplicitBE };

/* What the walk learnt. Offsets are into the input, or into inflated when deflated. */
struct Scan {
    Enc enc = Enc::ExplicitLE;
    bool deflated = false;
    std::string inflated; /* the inflated data set of a deflated file */
    size_t ds_start = 0;  /* where the data set starts */
    size_t stop = 0;      /* GDCM may read [ds_start, stop): everything that was checked */
    bool has_pixel_data = false;
    std::string ts_uid; /* (0002,0010), "" without file meta information */
    std::string meta_sop_class;
    Tree tree; /* the data set's elements (base set once the walk is done) */
};

/*
 * Find the transfer syntax the way GDCM's Reader does (preamble, file meta information, or
 * a guess from the first element of a bare data set), check the structure and record it in
 * s.tree. full: walk the whole input (pixel decode), else stop at Pixel Data. Returns LC_OK,
 * LC_ERR_DICOM or LC_ERR_IO with why set.
 */
lc_rc scan(Input &in, bool full, Scan &s, std::string &why);

/* ---- dictionary (dicom_dict.cc) ----------------------------------------------------------- */

/* The VR the public dictionary gives tag (repeating groups 50xx/60xx folded, group lengths UL,
 * private creators LO); ambiguous entries resolve to the first choice ("US or SS" -> US, "OB
 * or OW" -> OW) except that pixrep1 picks SS for "US or SS". 0 when unknown (private data). */
uint16_t dict_vr(uint32_t tag, bool pixrep1);
/* 1 when tag is a sequence in the public dictionary. */
bool dict_is_sq(uint32_t tag);
/* The VR GDCM's private dictionary gives private element tag of the block reserved by creator
 * (the Private Creator value, trimmed); 0 when unknown or UN. */
uint16_t dict_private_vr(uint32_t tag, const char *creator, bool pixrep1);

/* ---- DICOM JSON (dicom_json.cc) ----------------------------------------------------------- */

struct JsonOpts {
    size_t inline_max; /* binary values up to this many bytes as InlineBinary */
    bool pixrep1;      /* PixelRepresentation 1 (for "US or SS" elements of implicit data) */
};

/* Append the data set whose elements are the children of parent (SIZE_MAX: top level) as a
 * DICOM JSON object (PS3.18 F.2). cs is the character set in force. */
void json_dataset(std::string &out, const Tree &t, size_t parent, const Charset &cs,
                  const JsonOpts &o, std::string &path);
/* Append the items of sequence node seq as a JSON array of DICOM JSON objects. */
void json_items(std::string &out, const Tree &t, size_t seq, const Charset &cs, const JsonOpts &o,
                std::string &path);

} // namespace lcdcm

#endif
