/*
 * dicom_charset.cc: Specific Character Set (0008,0005) decoding to UTF-8 for lc_dicom: whole-
 * value encodings (UTF-8, GB18030, GBK) through iconv, and ISO 2022 code extensions (Latin
 * sets, Cyrillic, Arabic, Greek, Hebrew, Thai, JIS X 0201/0208/0212, KS X 1001, GB 2312) as
 * PS3.5 6.1.2.5 describes. Pure functions; each call opens its own iconv descriptors.
 */
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include <iconv.h>

#include "dicom_internal.h"

namespace lcdcm
{
namespace
{

const char kReplacement[] = "\xEF\xBF\xBD"; /* U+FFFD */

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

} // namespace

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

namespace
{

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

} // namespace

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

} // namespace lcdcm
