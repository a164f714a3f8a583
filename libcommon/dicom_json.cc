/*
 * dicom_json.cc: the DICOM JSON model (PS3.18 Annex F) of a checked element tree, for WADO-RS
 * metadata: objects keyed "GGGGEEEE", {"vr", "Value": [...]}, PN as {"Alphabetic",
 * "Ideographic", "Phonetic"}, numbers as JSON numbers, AT as hex strings, sequences recursive,
 * small binary values as InlineBinary, larger ones as a relative BulkDataURI. Strings are
 * decoded with the Specific Character Set in force (an item may carry its own). The output is
 * valid JSON (and valid for PostgreSQL's jsonb: no \u0000) for any tree. Pure functions.
 */
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "dicom_internal.h"

namespace lcdcm
{
namespace
{

/* Values above this many bytes become a BulkDataURI whatever their VR (PS3.18 F.2.2 allows it
 * for the numeric and long text VRs), so no single element can blow up the document. */
const size_t kBulkAny = 64 * 1024;

constexpr uint16_t V(const char s[3])
{
    return vr2(s[0], s[1]);
}

/* VR classes by the VR's two letters (one table lookup instead of list scans). */
enum : uint8_t {
    C_STRING = 1, /* a string in the data set */
    C_TEXT = 2,   /* the Specific Character Set applies */
    C_SINGLE = 4, /* one value: a backslash is part of it */
    C_BULK = 8,   /* binary: InlineBinary or BulkDataURI */
    C_LEFT = 16,  /* leading spaces are significant */
};
struct VrClasses {
    uint8_t cls[26][26] = {};
    void set(const char *list, uint8_t bit)
    {
        for (const char *p = list; p[0] && p[1]; p += 2)
            cls[p[0] - 'A'][p[1] - 'A'] |= bit;
    }
    VrClasses()
    {
        set("AEASCSDADSDTISLOLTPNSHSTTMUCUIURUT", C_STRING);
        set("SHLOSTLTUTPNUC", C_TEXT);
        set("LTSTUTUR", C_SINGLE);
        set("OBODOFOLOVOWUN", C_BULK);
        set("LTSTUT", C_LEFT);
    }
    uint8_t of(uint16_t vr) const
    {
        const unsigned a = unsigned(vr >> 8) - 'A', b = unsigned(vr & 0xFF) - 'A';
        return a < 26 && b < 26 ? cls[a][b] : 0;
    }
};
const VrClasses kCls;

bool string_vr(uint16_t vr)
{
    return kCls.of(vr) & C_STRING;
}
bool text_vr(uint16_t vr)
{
    return kCls.of(vr) & C_TEXT;
}
bool single_vr(uint16_t vr)
{
    return kCls.of(vr) & C_SINGLE;
}
bool bulk_vr(uint16_t vr)
{
    return kCls.of(vr) & C_BULK;
}

void hex8(std::string &out, uint32_t tag)
{
    static const char hx[] = "0123456789ABCDEF";
    for (int s = 28; s >= 0; s -= 4)
        out += hx[(tag >> s) & 0xF];
}

/* A JSON string from valid UTF-8: quotes, backslashes and control characters escaped; NUL,
 * which jsonb refuses even escaped, becomes U+FFFD. */
void put_string(std::string &out, const char *p, size_t n)
{
    static const char hx[] = "0123456789abcdef";
    out += '"';
    for (size_t i = 0; i < n; i++) {
        const unsigned char c = (unsigned char)p[i];
        if (c == '"' || c == '\\') {
            out += '\\';
            out += char(c);
        } else if (c == 0) {
            out += "\xEF\xBF\xBD";
        } else if (c < 0x20) {
            switch (c) {
            case '\n':
                out += "\\n";
                break;
            case '\r':
                out += "\\r";
                break;
            case '\t':
                out += "\\t";
                break;
            case '\b':
                out += "\\b";
                break;
            case '\f':
                out += "\\f";
                break;
            default:
                out += "\\u00";
                out += hx[c >> 4];
                out += hx[c & 0xF];
            }
        } else {
            out += char(c);
        }
    }
    out += '"';
}

void put_base64(std::string &out, const unsigned char *p, size_t n)
{
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    out += '"';
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        const uint32_t v = uint32_t(p[i]) << 16 | uint32_t(p[i + 1]) << 8 | p[i + 2];
        out += b64[v >> 18];
        out += b64[(v >> 12) & 63];
        out += b64[(v >> 6) & 63];
        out += b64[v & 63];
    }
    if (n - i == 1) {
        const uint32_t v = uint32_t(p[i]) << 16;
        out += b64[v >> 18];
        out += b64[(v >> 12) & 63];
        out += "==";
    } else if (n - i == 2) {
        const uint32_t v = uint32_t(p[i]) << 16 | uint32_t(p[i + 1]) << 8;
        out += b64[v >> 18];
        out += b64[(v >> 12) & 63];
        out += b64[(v >> 6) & 63];
        out += '=';
    }
    out += '"';
}

/* 1 when s[0, n) is a number in JSON's grammar */
bool json_number(const char *s, size_t n)
{
    size_t i = 0;
    if (i < n && s[i] == '-')
        i++;
    if (i >= n || !(s[i] >= '0' && s[i] <= '9'))
        return false;
    if (s[i] == '0')
        i++;
    else
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
    if (i < n && s[i] == '.') {
        i++;
        if (i >= n || !(s[i] >= '0' && s[i] <= '9'))
            return false;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-'))
            i++;
        if (i >= n || !(s[i] >= '0' && s[i] <= '9'))
            return false;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
    }
    return i == n;
}

/* The shortest form that reads back as v (as a float when single). */
void put_double(std::string &out, double v, bool single)
{
    char buf[64];
    const std::to_chars_result r = single ? std::to_chars(buf, buf + sizeof(buf), float(v))
                                          : std::to_chars(buf, buf + sizeof(buf), v);
    if (r.ec == std::errc())
        out.append(buf, size_t(r.ptr - buf));
    else
        out += "null";
}

template <typename T> void put_int(std::string &out, T v)
{
    char buf[24];
    const std::to_chars_result r = std::to_chars(buf, buf + sizeof(buf), v);
    out.append(buf, size_t(r.ptr - buf));
}

/* A DS or IS value (trimmed): as written when it is a JSON number, else converted, else (not a
 * number at all) as a string, so nothing is lost and the JSON stays valid. */
void put_decimal(std::string &out, const char *p, size_t n)
{
    if (json_number(p, n)) {
        out.append(p, n);
        return;
    }
    char buf[64];
    if (n > 0 && n < sizeof(buf)) {
        memcpy(buf, p, n);
        buf[n] = '\0';
        char *end = nullptr;
        const double v = strtod(buf, &end);
        if (end != buf && *end == '\0' && std::isfinite(v)) {
            put_double(out, v, false);
            return;
        }
    }
    put_string(out, p, n);
}

void trim_right(const char *p, size_t *n)
{
    while (*n > 0 && (p[*n - 1] == ' ' || p[*n - 1] == '\0'))
        (*n)--;
}

void trim_left(const char **p, size_t *n)
{
    while (*n > 0 && **p == ' ')
        (*p)++, (*n)--;
}

/* One PN value: {"Alphabetic": ..., "Ideographic": ..., "Phonetic": ...}, empty groups left
 * out; an empty value is null. */
void put_pn(std::string &out, const char *p, size_t n)
{
    static const char *const names[3] = {"Alphabetic", "Ideographic", "Phonetic"};
    if (n == 0) {
        out += "null";
        return;
    }
    out += '{';
    bool first = true;
    size_t i = 0;
    for (int g = 0; g < 3 && i <= n; g++) {
        size_t j = i;
        while (j < n && p[j] != '=')
            j++;
        const char *s = p + i;
        size_t len = j - i;
        trim_right(s, &len);
        trim_left(&s, &len);
        if (len > 0) {
            if (!first)
                out += ',';
            first = false;
            out += '"';
            out += names[g];
            out += "\":";
            put_string(out, s, len);
        }
        i = j + 1;
    }
    out += '}';
}

/* The values of a string element. */
void put_strings(std::string &out, uint16_t vr, const char *raw, size_t rn, const Charset &cs)
{
    static const Charset ascii;
    std::string s;
    to_utf8(s, text_vr(vr) ? cs : ascii, raw, rn, vr == V("PN"));
    size_t total = s.size();
    trim_right(s.data(), &total);
    if (total == 0)
        return; /* no value */
    out += ",\"Value\":[";
    const bool single = single_vr(vr);
    const bool keep_left = kCls.of(vr) & C_LEFT;
    size_t i = 0;
    bool first = true;
    for (;;) {
        size_t j = i;
        if (single)
            j = total;
        else
            while (j < total && s[j] != '\\')
                j++;
        const char *v = s.data() + i;
        size_t len = j - i;
        trim_right(v, &len);
        if (!keep_left)
            trim_left(&v, &len);
        if (!first)
            out += ',';
        first = false;
        if (vr == V("PN"))
            put_pn(out, v, len);
        else if (len == 0)
            out += "null";
        else if (vr == V("DS") || vr == V("IS"))
            put_decimal(out, v, len);
        else
            put_string(out, v, len);
        if (j >= total)
            break;
        i = j + 1;
    }
    out += ']';
}

uint64_t read_uint(const unsigned char *p, unsigned size, bool big)
{
    uint64_t v = 0;
    for (unsigned k = 0; k < size; k++)
        v = big ? v << 8 | p[k] : v | uint64_t(p[k]) << (8 * k);
    return v;
}

/* The values of a binary numeric element (US SS UL SL FL FD SV UV AT). */
void put_numbers(std::string &out, uint16_t vr, const unsigned char *p, size_t n, bool big)
{
    const unsigned size = vr == V("US") || vr == V("SS")                    ? 2
                          : vr == V("FD") || vr == V("SV") || vr == V("UV") ? 8
                                                                            : 4;
    const size_t count = n / size;
    if (count == 0)
        return;
    out += ",\"Value\":[";
    for (size_t k = 0; k < count; k++) {
        if (k)
            out += ',';
        const unsigned char *q = p + k * size;
        if (vr == V("AT")) {
            const uint32_t g = uint32_t(read_uint(q, 2, big)),
                           e = uint32_t(read_uint(q + 2, 2, big));
            out += '"';
            hex8(out, g << 16 | e);
            out += '"';
            continue;
        }
        const uint64_t u = read_uint(q, size, big);
        if (vr == V("US") || vr == V("UL")) {
            put_int(out, u);
        } else if (vr == V("SS")) {
            put_int(out, int(int16_t(uint16_t(u))));
        } else if (vr == V("SL")) {
            put_int(out, int(int32_t(uint32_t(u))));
        } else if (vr == V("FL") || vr == V("FD")) {
            double d;
            if (size == 4) {
                float f;
                const uint32_t w = uint32_t(u);
                memcpy(&f, &w, 4);
                d = f;
            } else {
                memcpy(&d, &u, 8);
            }
            if (!std::isfinite(d))
                out += "null"; /* JSON has no NaN or infinity */
            else
                put_double(out, d, size == 4);
        } else { /* SV, UV: numbers while exact in a double, else strings (PS3.18 F.2.3) */
            const bool sv = vr == V("SV");
            const uint64_t mag = sv && int64_t(u) < 0 ? 0 - u : u;
            const bool quote = mag >= (uint64_t(1) << 53);
            if (quote)
                out += '"';
            if (sv)
                put_int(out, (long long)int64_t(u));
            else
                put_int(out, (unsigned long long)u);
            if (quote)
                out += '"';
        }
    }
    out += ']';
}

/* Private Creator values of one data set by (group, block), found on first need. */
struct Creators {
    bool built = false;
    std::vector<std::pair<uint32_t, std::string>> v; /* group << 8 | block -> creator */
    const char *of(const Tree &t, size_t parent, uint32_t tag)
    {
        if (!built) {
            built = true;
            each_child(t, parent, [&](size_t i) {
                const Node &n = t.nodes[i];
                const uint16_t g = uint16_t(n.tag >> 16), e = uint16_t(n.tag);
                if ((g & 1) && e >= 0x10 && e <= 0xFF && n.kind == N_VALUE) {
                    const char *p = reinterpret_cast<const char *>(t.base + n.off);
                    size_t len = n.len;
                    trim_right(p, &len);
                    trim_left(&p, &len);
                    v.emplace_back(uint32_t(g) << 8 | e, std::string(p, len));
                }
            });
        }
        const uint32_t key = (tag >> 16) << 8 | ((tag >> 8) & 0xFF);
        for (const auto &c : v)
            if (c.first == key)
                return c.second.c_str();
        return nullptr;
    }
};

/* The effective VR of a node for JSON: SQ for sequences; the dictionary's (the private
 * dictionary's for private data) for implicit data and for UN values (little endian only:
 * their bytes are then what the dictionary VR would hold); UN when nothing is known. */
uint16_t node_vr(const Tree &t, size_t parent, const Node &n, const JsonOpts &o, Creators &cr)
{
    if (n.kind == N_SEQ)
        return V("SQ");
    uint16_t vr = n.vr;
    if (vr == 0 || (vr == V("UN") && !t.big)) {
        const uint16_t g = uint16_t(n.tag >> 16), e = uint16_t(n.tag);
        uint16_t d;
        if ((g & 1) && e > 0xFF)
            d = dict_private_vr(n.tag, cr.of(t, parent, n.tag), o.pixrep1);
        else
            d = dict_vr(n.tag, o.pixrep1);
        vr = d && d != V("SQ") ? d : V("UN");
    }
    return vr;
}

bool skipped(const Node &n)
{
    const uint16_t g = uint16_t(n.tag >> 16), e = uint16_t(n.tag);
    return n.kind == N_ITEM || n.kind == N_FRAGS || g == 0x0002 || e == 0x0000 ||
           n.tag == 0xFFFCFFFCu || (g == 0x7FE0 && (e == 0x0008 || e == 0x0009 || e == 0x0010));
}

void put_element(std::string &out, const Tree &t, size_t parent, size_t i, const Charset &cs,
                 const JsonOpts &o, std::string &path, Creators &cr)
{
    const Node &n = t.nodes[i];
    const uint16_t vr = node_vr(t, parent, n, o, cr);
    out += '"';
    hex8(out, n.tag);
    out += "\":{\"vr\":\"";
    out += char(vr >> 8);
    out += char(vr & 0xFF);
    out += '"';
    const unsigned char *p = t.base + n.off;
    if (n.kind == N_SEQ) {
        if (n.end > i + 1) {
            const size_t mark = path.size();
            hex8(path, n.tag);
            path += '/';
            out += ",\"Value\":";
            json_items(out, t, i, cs, o, path);
            path.resize(mark);
        }
    } else if (n.len == 0) {
        /* no value */
    } else if ((bulk_vr(vr) && n.len > o.inline_max) || n.len > kBulkAny) {
        out += ",\"BulkDataURI\":\"bulk/";
        out += path;
        hex8(out, n.tag);
        out += '"';
    } else if (bulk_vr(vr)) {
        const unsigned unit = vr == V("OW")                    ? 2
                              : vr == V("OF") || vr == V("OL") ? 4
                              : vr == V("OD") || vr == V("OV") ? 8
                                                               : 1;
        out += ",\"InlineBinary\":";
        if (t.big && unit > 1 && !(n.flags & N_IMPLICIT)) {
            std::string le(reinterpret_cast<const char *>(p), n.len);
            for (size_t k = 0; k + unit <= le.size(); k += unit)
                for (unsigned a = 0, b = unit - 1; a < b; a++, b--)
                    std::swap(le[k + a], le[k + b]);
            put_base64(out, reinterpret_cast<const unsigned char *>(le.data()), le.size());
        } else {
            put_base64(out, p, n.len);
        }
    } else if (string_vr(vr)) {
        put_strings(out, vr, reinterpret_cast<const char *>(p), n.len, cs);
    } else {
        put_numbers(out, vr, p, n.len, t.big && !(n.flags & N_IMPLICIT));
    }
    out += '}';
}

} // namespace

void json_dataset(std::string &out, const Tree &t, size_t parent, const Charset &cs,
                  const JsonOpts &o, std::string &path)
{
    out += '{';
    bool first = true;
    uint32_t last = 0;
    bool have_last = false;
    std::vector<uint32_t> seen; /* only filled once tags go out of order */
    Creators cr;
    each_child(t, parent, [&](size_t i) {
        const Node &n = t.nodes[i];
        if (skipped(n))
            return;
        if (have_last && n.tag <= last) { /* out of order: emit a tag only once */
            if (seen.empty())
                each_child(t, parent, [&](size_t k) {
                    if (k < i && !skipped(t.nodes[k]))
                        seen.push_back(t.nodes[k].tag);
                });
            for (uint32_t s : seen)
                if (s == n.tag)
                    return;
        }
        if (!seen.empty())
            seen.push_back(n.tag);
        if (!have_last || n.tag > last)
            last = n.tag;
        have_last = true;
        if (!first)
            out += ',';
        first = false;
        put_element(out, t, parent, i, cs, o, path, cr);
    });
    out += '}';
}

void json_items(std::string &out, const Tree &t, size_t seq, const Charset &cs, const JsonOpts &o,
                std::string &path)
{
    out += '[';
    size_t k = 0;
    each_child(t, seq, [&](size_t item) {
        if (k)
            out += ',';
        /* an item may carry its own Specific Character Set */
        Charset ics = cs;
        each_child(t, item, [&](size_t e) {
            const Node &n = t.nodes[e];
            if (n.tag == 0x00080005u && n.kind == N_VALUE && n.len > 0) {
                std::string spec(reinterpret_cast<const char *>(t.base + n.off), n.len);
                ics = parse_charset(spec.c_str());
            }
        });
        const size_t mark = path.size();
        char buf[24];
        snprintf(buf, sizeof(buf), "%zu/", k);
        path += buf;
        json_dataset(out, t, item, ics, o, path);
        path.resize(mark);
        k++;
    });
    out += ']';
}

} // namespace lcdcm
