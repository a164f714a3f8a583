/*
 * dicom_dict.cc: the DICOM data dictionary for lc_dicom, taken from GDCM's public dictionary
 * once (on first use) into two sorted tables: tag -> VR (implicit VR data sets, UN values) and
 * keyword -> tag (lc_dicom_keyword_tag, used by the uploader's name patterns); private
 * elements are looked up in GDCM's private dictionary by their creator.
 * The tables are built under a function-local static (thread-safe initialisation) and are
 * read-only afterwards, so every lookup is reentrant.
 */
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-copy"
#ifdef __clang__
#pragma clang diagnostic ignored "-Wdeprecated-copy-with-user-provided-copy"
#endif
#include "gdcmDict.h"
#include "gdcmDicts.h"
#include "gdcmGlobal.h"
#include "gdcmPrivateTag.h"
#pragma GCC diagnostic pop

#include "dicom_internal.h"

extern "C" {
#include "lc/dicom.h"
}

namespace
{

/* VR codes for the dictionary's ambiguous entries (never written to a file or to JSON). */
const uint16_t kUS_SS = lcdcm::vr2('u', 's');

struct TagVR {
    uint32_t tag;
    uint16_t vr;
};

struct KeywordTag {
    std::string keyword;
    uint32_t tag;
    uint16_t vr;
};

struct Tables {
    std::vector<TagVR> by_tag;          /* sorted by tag */
    std::vector<KeywordTag> by_keyword; /* sorted by keyword, first tag of a duplicate kept */
};

uint16_t from_gdcm(gdcm::VR::VRType t)
{
    if (t == gdcm::VR::US_SS)
        return kUS_SS;
    if (t == gdcm::VR::OB_OW || t == gdcm::VR::US_SS_OW || t == gdcm::VR::US_OW)
        return lcdcm::vr2('O', 'W');
    const char *s = gdcm::VR::GetVRString(t);
    if (!s || strlen(s) != 2 || !(s[0] >= 'A' && s[0] <= 'Z') || !(s[1] >= 'A' && s[1] <= 'Z'))
        return 0;
    return lcdcm::vr2(s[0], s[1]);
}

const Tables &tables()
{
    static const Tables t = [] {
        Tables r;
        const gdcm::Dict &d = gdcm::Global::GetInstance().GetDicts().GetPublicDict();
        for (gdcm::Dict::ConstIterator it = d.Begin(); it != d.End(); ++it) {
            const uint32_t tag = uint32_t(it->first.GetGroup()) << 16 | it->first.GetElement();
            if (tag == 0xFFFFFFFFu)
                continue; /* GDCM's "unknown" entry */
            const uint16_t vr = from_gdcm(gdcm::VR::VRType(it->second.GetVR()));
            r.by_tag.push_back({tag, vr});
            const char *kw = it->second.GetKeyword();
            if (kw && *kw)
                r.by_keyword.push_back({kw, tag, vr});
        }
        std::sort(r.by_tag.begin(), r.by_tag.end(),
                  [](const TagVR &a, const TagVR &b) { return a.tag < b.tag; });
        std::stable_sort(
            r.by_keyword.begin(), r.by_keyword.end(),
            [](const KeywordTag &a, const KeywordTag &b) { return a.keyword < b.keyword; });
        r.by_keyword.erase(std::unique(r.by_keyword.begin(), r.by_keyword.end(),
                                       [](const KeywordTag &a, const KeywordTag &b) {
                                           return a.keyword == b.keyword;
                                       }),
                           r.by_keyword.end());
        return r;
    }();
    return t;
}

/* The dictionary's VR for tag, kUS_SS for "US or SS", 0 when unknown. */
uint16_t lookup(uint32_t tag)
{
    const uint16_t g = uint16_t(tag >> 16), e = uint16_t(tag);
    if (g & 1) /* private: creators are LO, the rest is unknown without the creator's dictionary */
        return e >= 0x0010 && e <= 0x00FF ? lcdcm::vr2('L', 'O') : 0;
    if (e == 0x0000)
        return lcdcm::vr2('U', 'L'); /* group length */
    if ((g & 0xFF00) == 0x5000 || (g & 0xFF00) == 0x6000)
        tag &= 0xFF00FFFFu; /* repeating groups: the dictionary lists 5000 and 6000 */
    const std::vector<TagVR> &v = tables().by_tag;
    auto it = std::lower_bound(v.begin(), v.end(), tag,
                               [](const TagVR &a, uint32_t t) { return a.tag < t; });
    return it != v.end() && it->tag == tag ? it->vr : 0;
}

} // namespace

namespace lcdcm
{

uint16_t dict_vr(uint32_t tag, bool pixrep1)
{
    const uint16_t vr = lookup(tag);
    if (vr == kUS_SS)
        return pixrep1 ? vr2('S', 'S') : vr2('U', 'S');
    return vr;
}

bool dict_is_sq(uint32_t tag)
{
    return lookup(tag) == vr2('S', 'Q');
}

uint16_t dict_private_vr(uint32_t tag, const char *creator, bool pixrep1)
{
    if (!creator || !*creator)
        return 0;
    const gdcm::PrivateDict &pd = gdcm::Global::GetInstance().GetDicts().GetPrivateDict();
    const gdcm::PrivateTag pt(uint16_t(tag >> 16), uint16_t(tag & 0xFF), creator);
    if (!pd.FindDictEntry(pt))
        return 0;
    const gdcm::VR::VRType t = gdcm::VR::VRType(pd.GetDictEntry(pt).GetVR());
    if (t == gdcm::VR::US_SS)
        return pixrep1 ? vr2('S', 'S') : vr2('U', 'S');
    const uint16_t vr = from_gdcm(t);
    return vr == vr2('U', 'N') ? 0 : vr;
}

} // namespace lcdcm

lc_rc lc_dicom_keyword_tag(const char *keyword, unsigned *tag, char vr[3])
{
    try {
        if (!keyword || !*keyword)
            return LC_ERR_NOT_FOUND;
        const std::vector<KeywordTag> &v = tables().by_keyword;
        auto it =
            std::lower_bound(v.begin(), v.end(), keyword, [](const KeywordTag &a, const char *k) {
                return strcmp(a.keyword.c_str(), k) < 0;
            });
        if (it == v.end() || it->keyword != keyword)
            return LC_ERR_NOT_FOUND;
        if (tag)
            *tag = it->tag;
        if (vr) {
            uint16_t c = it->vr == kUS_SS ? lcdcm::vr2('U', 'S') : it->vr;
            vr[0] = c ? char(c >> 8) : 'U';
            vr[1] = c ? char(c & 0xFF) : 'N';
            vr[2] = '\0';
        }
        return LC_OK;
    } catch (...) {
        return LC_ERR_NOMEM;
    }
}
