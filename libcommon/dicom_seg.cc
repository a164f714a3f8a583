/*
 * dicom_seg.cc: lc_dicom_read_image_info and lc_dicom_seg_write (lc/dicom_seg.h) over GDCM 3.
 * Owned by the segmenter. GDCM 3.0.21 asserts on hostile input, so a file reaches gdcm::Reader
 * only after lc_dicom_read_header (dicom.cc, which checks every byte up to Pixel Data)
 * accepted it, and only up to Pixel Data. The SEG is built element by element and written
 * with gdcm::Writer into memory. Reentrant; no C++ exception crosses the C boundary.
 */
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <mutex>
#include <new>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <sys/random.h>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-copy"
#ifdef __clang__
#pragma clang diagnostic ignored "-Wdeprecated-copy-with-user-provided-copy"
#endif
#include "gdcmDataSet.h"
#include "gdcmItem.h"
#include "gdcmReader.h"
#include "gdcmSequenceOfItems.h"
#include "gdcmTrace.h"
#include "gdcmTransferSyntax.h"
#include "gdcmWriter.h"
#pragma GCC diagnostic pop

extern "C" {
#include "lc/dicom_seg.h"
}

namespace
{

const gdcm::Tag kPixelData(0x7fe0, 0x0010);

/* ---- reading ----------------------------------------------------------------------------- */

/* The value of (g,e) in ds as text without trailing blanks and NULs; "" when absent. */
std::string str_of(const gdcm::DataSet &ds, uint16_t g, uint16_t e)
{
    const gdcm::Tag t(g, e);
    if (!ds.FindDataElement(t))
        return std::string();
    const gdcm::ByteValue *bv = ds.GetDataElement(t).GetByteValue();
    if (!bv || !bv->GetPointer())
        return std::string();
    std::string s(bv->GetPointer(), bv->GetLength());
    size_t end = s.find_last_not_of(std::string(" \0", 2));
    s.erase(end == std::string::npos ? 0 : end + 1);
    size_t start = s.find_first_not_of(' ');
    return start == std::string::npos ? std::string() : s.substr(start);
}

/* count backslash-separated decimal strings; false unless exactly count finite values. */
bool ds_values(const gdcm::DataSet &ds, uint16_t g, uint16_t e, double *out, int count)
{
    std::string s = str_of(ds, g, e);
    if (s.empty())
        return false;
    const char *p = s.c_str();
    for (int i = 0; i < count; i++) {
        char *end;
        while (*p == ' ')
            p++;
        double v = strtod(p, &end);
        if (end == p || !std::isfinite(v))
            return false;
        out[i] = v;
        p = end;
        while (*p == ' ')
            p++;
        if (i + 1 < count) {
            if (*p != '\\')
                return false;
            p++;
        }
    }
    return *p == '\0';
}

bool is_value(const gdcm::DataSet &ds, uint16_t g, uint16_t e, long *out)
{
    std::string s = str_of(ds, g, e);
    if (s.empty())
        return false;
    char *end;
    long v = strtol(s.c_str(), &end, 10);
    if (*end != '\0')
        return false;
    *out = v;
    return true;
}

/* An unsigned long (UL) value in ds as GDCM holds it (host order after reading). */
bool ul_value(const gdcm::DataSet &ds, uint16_t g, uint16_t e, long *out)
{
    const gdcm::Tag t(g, e);
    if (!ds.FindDataElement(t))
        return false;
    const gdcm::ByteValue *bv = ds.GetDataElement(t).GetByteValue();
    if (!bv || bv->GetLength() < 4)
        return false;
    uint32_t v;
    memcpy(&v, bv->GetPointer(), 4);
    *out = long(v);
    return true;
}

/* The first item's data set of the sequence (g,e) in ds, or NULL. */
const gdcm::DataSet *item_of(const gdcm::DataSet &ds, uint16_t g, uint16_t e, size_t index = 1)
{
    const gdcm::Tag t(g, e);
    if (!ds.FindDataElement(t))
        return nullptr;
    gdcm::SmartPointer<gdcm::SequenceOfItems> sq = ds.GetDataElement(t).GetValueAsSQ();
    if (!sq || sq->GetNumberOfItems() < index)
        return nullptr;
    return &sq->GetItem(index).GetNestedDataSet();
}

size_t items_in(const gdcm::DataSet &ds, uint16_t g, uint16_t e)
{
    const gdcm::Tag t(g, e);
    if (!ds.FindDataElement(t))
        return 0;
    gdcm::SmartPointer<gdcm::SequenceOfItems> sq = ds.GetDataElement(t).GetValueAsSQ();
    return sq ? sq->GetNumberOfItems() : 0;
}

/* Fill f from one functional-group item (per-frame or shared); only what the item holds. */
void frame_from_group(const gdcm::DataSet &grp, lc_dicom_frame_geom *f)
{
    if (const gdcm::DataSet *it = item_of(grp, 0x0020, 0x9113))
        if (ds_values(*it, 0x0020, 0x0032, f->ipp, 3))
            f->has_ipp = 1;
    if (const gdcm::DataSet *it = item_of(grp, 0x0020, 0x9116))
        if (ds_values(*it, 0x0020, 0x0037, f->iop, 6))
            f->has_iop = 1;
    if (const gdcm::DataSet *it = item_of(grp, 0x0028, 0x9110)) {
        if (ds_values(*it, 0x0028, 0x0030, f->pixel_spacing, 2))
            f->has_spacing = 1;
        double t;
        if (ds_values(*it, 0x0018, 0x0050, &t, 1))
            f->slice_thickness = t;
    }
    if (const gdcm::DataSet *it = item_of(grp, 0x0028, 0x9145)) {
        double v;
        if (ds_values(*it, 0x0028, 0x1053, &v, 1) && v != 0.0)
            f->rescale_slope = v;
        if (ds_values(*it, 0x0028, 0x1052, &v, 1))
            f->rescale_intercept = v;
    }
    if (const gdcm::DataSet *it = item_of(grp, 0x0020, 0x9111)) {
        long t;
        if (ul_value(*it, 0x0020, 0x9128, &t))
            f->temporal_index = t;
    }
}

char *dup_or_null(const std::string &s)
{
    if (s.empty())
        return nullptr;
    char *p = strdup(s.c_str());
    if (!p)
        throw std::bad_alloc();
    return p;
}

lc_rc read_info(const char *path, lc_dicom_image_info *info, lc_err *err)
{
    lc_dicom_header *h = info->hdr;
    static std::once_flag quiet;
    std::call_once(quiet, [] { /* GDCM's own stderr warnings: errors come through lc_err */
                               gdcm::Trace::SetDebug(false);
                               gdcm::Trace::SetWarning(false);
                               gdcm::Trace::SetError(false);
    });
    gdcm::Reader r;
    r.SetFileName(path);
    if (!r.ReadUpToTag(kPixelData, std::set<gdcm::Tag>{kPixelData}))
        return lc_err_set(err, LC_ERR_DICOM, "could not parse \"%s\" with GDCM", path);
    const gdcm::DataSet &ds = r.GetFile().GetDataSet();

    info->frame_of_reference_uid = dup_or_null(str_of(ds, 0x0020, 0x0052));
    info->mr_acquisition_type = dup_or_null(str_of(ds, 0x0018, 0x0023));
    info->manufacturer = dup_or_null(str_of(ds, 0x0008, 0x0070));
    info->acquisition_time = dup_or_null(str_of(ds, 0x0008, 0x0032));
    double tilt;
    if (ds_values(ds, 0x0018, 0x1120, &tilt, 1))
        info->gantry_tilt = tilt;

    int n = h->number_of_frames > 0 ? h->number_of_frames : 1;
    info->frames = (lc_dicom_frame_geom *)calloc(size_t(n), sizeof(lc_dicom_frame_geom));
    if (!info->frames)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    info->nframes = n;

    /* the defaults every frame starts from: the top-level attributes as lc_dicom read them */
    lc_dicom_frame_geom top = {};
    top.has_ipp = h->has_ipp;
    top.has_iop = h->has_iop;
    top.has_spacing = h->has_pixel_spacing;
    memcpy(top.ipp, h->ipp, sizeof(top.ipp));
    memcpy(top.iop, h->iop, sizeof(top.iop));
    memcpy(top.pixel_spacing, h->pixel_spacing, sizeof(top.pixel_spacing));
    top.slice_thickness = h->has_slice_thickness ? h->slice_thickness : 0;
    top.rescale_slope = h->rescale_slope;
    top.rescale_intercept = h->rescale_intercept;
    long tp;
    if (is_value(ds, 0x0020, 0x0100, &tp))
        top.temporal_index = tp;

    const gdcm::DataSet *shared = item_of(ds, 0x5200, 0x9229);
    size_t nper = items_in(ds, 0x5200, 0x9230);
    info->enhanced = nper > 0;
    if (info->enhanced) {
        /* lc_dicom filled the top-level values from the shared group and the first frame:
         * per-frame values start from the file's top level and the shared group only */
        top.has_ipp = ds_values(ds, 0x0020, 0x0032, top.ipp, 3);
        top.has_iop = ds_values(ds, 0x0020, 0x0037, top.iop, 6);
        top.has_spacing = ds_values(ds, 0x0028, 0x0030, top.pixel_spacing, 2);
        if (shared)
            frame_from_group(*shared, &top);
    }
    gdcm::SmartPointer<gdcm::SequenceOfItems> per;
    if (nper)
        per = ds.GetDataElement(gdcm::Tag(0x5200, 0x9230)).GetValueAsSQ();
    for (int i = 0; i < n; i++) {
        lc_dicom_frame_geom *f = &info->frames[i];
        *f = top;
        if (per && size_t(i) < per->GetNumberOfItems()) {
            frame_from_group(per->GetItem(size_t(i) + 1).GetNestedDataSet(), f);
        } else if (info->enhanced) {
            /* a frame without its functional group has no position of its own */
            f->has_ipp = 0;
        }
    }
    return LC_OK;
}

/* ---- writing ----------------------------------------------------------------------------- */

typedef gdcm::SmartPointer<gdcm::SequenceOfItems> Seq;

/* Insert (g,e) with vr and the value padded to even length (UI with NUL, others blank). */
void put(gdcm::DataSet &ds, uint16_t g, uint16_t e, gdcm::VR::VRType vr, std::string v)
{
    if (v.size() % 2)
        v.push_back(vr == gdcm::VR::UI ? '\0' : ' ');
    gdcm::DataElement de(gdcm::Tag(g, e));
    de.SetVR(vr);
    de.SetByteValue(v.data(), uint32_t(v.size()));
    ds.Replace(de);
}

void put_binary(gdcm::DataSet &ds, uint16_t g, uint16_t e, gdcm::VR::VRType vr, const void *p,
                size_t n)
{
    gdcm::DataElement de(gdcm::Tag(g, e));
    de.SetVR(vr);
    de.SetByteValue(static_cast<const char *>(p), uint32_t(n));
    ds.Replace(de);
}

void put_us(gdcm::DataSet &ds, uint16_t g, uint16_t e, std::vector<uint16_t> v)
{
    put_binary(ds, g, e, gdcm::VR::US, v.data(), v.size() * 2);
}

void put_ul(gdcm::DataSet &ds, uint16_t g, uint16_t e, std::vector<uint32_t> v)
{
    put_binary(ds, g, e, gdcm::VR::UL, v.data(), v.size() * 4);
}

/* An attribute tag as an AT value: group then element, each little endian. */
void put_at(gdcm::DataSet &ds, uint16_t g, uint16_t e, uint16_t vg, uint16_t ve)
{
    uint16_t v[2] = {vg, ve};
    put_binary(ds, g, e, gdcm::VR::AT, v, 4);
}

/* A sequence (g,e) of the given items, undefined lengths throughout. */
void put_seq(gdcm::DataSet &ds, uint16_t g, uint16_t e, const std::vector<gdcm::DataSet> &items)
{
    Seq sq = new gdcm::SequenceOfItems;
    sq->SetLengthToUndefined();
    for (const gdcm::DataSet &it : items) {
        gdcm::Item item;
        item.SetVLToUndefined();
        item.SetNestedDataSet(it);
        sq->AddItem(item);
    }
    gdcm::DataElement de(gdcm::Tag(g, e));
    de.SetVR(gdcm::VR::SQ);
    de.SetValue(*sq);
    de.SetVLToUndefined();
    ds.Replace(de);
}

gdcm::DataSet code_item(const lc_dicom_code &c)
{
    gdcm::DataSet it;
    put(it, 0x0008, 0x0100, gdcm::VR::SH, c.value);
    put(it, 0x0008, 0x0102, gdcm::VR::SH, c.scheme);
    put(it, 0x0008, 0x0104, gdcm::VR::LO, c.meaning);
    return it;
}

std::string ds_str(double v)
{
    char b[32];
    /* DS holds at most 16 characters */
    for (int prec = 10; prec > 0; prec--) {
        snprintf(b, sizeof(b), "%.*g", prec, v);
        if (strlen(b) <= 16)
            break;
    }
    return b;
}

std::string ds_list(const double *v, int n)
{
    std::string s;
    for (int i = 0; i < n; i++) {
        if (i)
            s += '\\';
        s += ds_str(v[i] == 0.0 ? 0.0 : v[i]); /* never "-0" */
    }
    return s;
}

std::string or_empty(const char *s)
{
    return s ? s : "";
}

/* sRGB 0..255 -> DICOM scaled CIELab (PS3.3 C.10.7.1.1: L 0..100, a, b -128..127 to 0..65535),
 * D65 white. */
std::vector<uint16_t> cielab(const int rgb[3])
{
    double lin[3];
    for (int i = 0; i < 3; i++) {
        double c = (rgb[i] < 0 ? 0 : rgb[i] > 255 ? 255 : rgb[i]) / 255.0;
        lin[i] = c <= 0.04045 ? c / 12.92 : pow((c + 0.055) / 1.055, 2.4);
    }
    double X = (0.4124 * lin[0] + 0.3576 * lin[1] + 0.1805 * lin[2]) / 0.95047;
    double Y = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2];
    double Z = (0.0193 * lin[0] + 0.1192 * lin[1] + 0.9505 * lin[2]) / 1.08883;
    auto f = [](double t) { return t > 0.008856 ? cbrt(t) : 7.787 * t + 16.0 / 116.0; };
    double L = 116 * f(Y) - 16, a = 500 * (f(X) - f(Y)), b = 200 * (f(Y) - f(Z));
    auto clamp = [](double v) { return uint16_t(v < 0 ? 0 : v > 65535 ? 65535 : lround(v)); };
    return {clamp(L * 65535 / 100), clamp((a + 128) * 65535 / 255), clamp((b + 128) * 65535 / 255)};
}

lc_rc check_spec(const lc_dicom_seg_spec *s, lc_err *err)
{
    if (!s || !s->ref || !s->sources || !s->segments || !s->labels || !s->source_series_uid)
        return lc_err_set(err, LC_ERR_INVALID, "segmentation: missing source, segments or labels");
    if (s->rows <= 0 || s->columns <= 0 || s->rows > 65535 || s->columns > 65535)
        return lc_err_set(err, LC_ERR_INVALID, "segmentation: bad frame size %dx%d", s->columns,
                          s->rows);
    if (s->nsources <= 0 || s->nsegments <= 0 || s->nsegments > 255)
        return lc_err_set(err, LC_ERR_INVALID, "segmentation: %d source frames, %d segments",
                          s->nsources, s->nsegments);
    if (!(s->slice_thickness > 0) || !(s->pixel_spacing[0] > 0) || !(s->pixel_spacing[1] > 0))
        return lc_err_set(err, LC_ERR_INVALID, "segmentation: spacing and thickness must be > 0");
    if (uint64_t(s->nsources) * uint64_t(s->nsegments) > 2147483647ull)
        return lc_err_set(err, LC_ERR_TOO_LARGE, "segmentation: too many frames");
    for (int i = 0; i < s->nsources; i++)
        if (!s->sources[i].sop_class_uid || !s->sources[i].sop_instance_uid)
            return lc_err_set(err, LC_ERR_INVALID, "segmentation: source frame %d has no UIDs",
                              i + 1);
    return LC_OK;
}

void now_da_tm(std::string &da, std::string &tm)
{
    char b[32];
    time_t t = time(nullptr);
    struct tm lt;
    localtime_r(&t, &lt);
    strftime(b, sizeof(b), "%Y%m%d", &lt);
    da = b;
    strftime(b, sizeof(b), "%H%M%S", &lt);
    tm = b;
}

lc_rc write_seg(const lc_dicom_seg_spec *s, std::string &out, char sop_uid[65], char series_uid[65],
                lc_err *err)
{
    const lc_dicom_header *ref = s->ref;
    const size_t plane = size_t(s->rows) * size_t(s->columns);
    const size_t nsrc = size_t(s->nsources);
    const size_t total = plane * nsrc;
    for (size_t i = 0; i < total; i++)
        if (s->labels[i] > s->nsegments)
            return lc_err_set(err, LC_ERR_INVALID,
                              "segmentation: label %d at voxel %zu but only %d segments",
                              s->labels[i], i, s->nsegments);
    bool temporal = false;
    for (size_t i = 0; i < nsrc; i++)
        temporal = temporal || s->sources[i].temporal_index > 0;

    char dim_org[65], for_uid[65];
    lc_dicom_seg_new_uid(sop_uid);
    lc_dicom_seg_new_uid(series_uid);
    lc_dicom_seg_new_uid(dim_org);
    if (s->frame_of_reference_uid && lc_dicom_uid_valid(s->frame_of_reference_uid))
        snprintf(for_uid, sizeof(for_uid), "%s", s->frame_of_reference_uid);
    else
        lc_dicom_seg_new_uid(for_uid);
    std::string da, tm;
    now_da_tm(da, tm);
    const char *seg_class = "1.2.840.10008.5.1.4.1.1.66.4";

    gdcm::DataSet ds;
    using V = gdcm::VR;
    /* SOP Common, Patient, General Study */
    put(ds, 0x0008, 0x0005, V::CS, "ISO_IR 192");
    put(ds, 0x0008, 0x0008, V::CS, "DERIVED\\PRIMARY");
    put(ds, 0x0008, 0x0012, V::DA, da);
    put(ds, 0x0008, 0x0013, V::TM, tm);
    put(ds, 0x0008, 0x0016, V::UI, seg_class);
    put(ds, 0x0008, 0x0018, V::UI, sop_uid);
    put(ds, 0x0008, 0x0020, V::DA, or_empty(ref->study_date));
    put(ds, 0x0008, 0x0021, V::DA, da);
    put(ds, 0x0008, 0x0023, V::DA, da);
    put(ds, 0x0008, 0x0030, V::TM, or_empty(ref->study_time));
    put(ds, 0x0008, 0x0031, V::TM, tm);
    put(ds, 0x0008, 0x0033, V::TM, tm);
    put(ds, 0x0008, 0x0050, V::SH, or_empty(ref->accession_number));
    put(ds, 0x0008, 0x0060, V::CS, "SEG");
    put(ds, 0x0008, 0x0070, V::LO, "radpipe");
    put(ds, 0x0008, 0x0090, V::PN, or_empty(ref->referring_physician_name));
    if (ref->study_description)
        put(ds, 0x0008, 0x1030, V::LO, ref->study_description);
    put(ds, 0x0008, 0x103E, V::LO, or_empty(s->series_description));
    put(ds, 0x0008, 0x1090, V::LO, "radpipe gpu-segmenter");
    put(ds, 0x0010, 0x0010, V::PN, or_empty(ref->patient_name));
    put(ds, 0x0010, 0x0020, V::LO, or_empty(ref->patient_id));
    put(ds, 0x0010, 0x0030, V::DA, or_empty(ref->patient_birth_date));
    put(ds, 0x0010, 0x0040, V::CS, or_empty(ref->patient_sex));
    /* Enhanced General Equipment */
    put(ds, 0x0018, 0x1000, V::LO, "0");
    put(ds, 0x0018, 0x1020, V::LO, s->software_version ? s->software_version : "radpipe");
    put(ds, 0x0020, 0x000D, V::UI, ref->study_instance_uid);
    put(ds, 0x0020, 0x000E, V::UI, series_uid);
    put(ds, 0x0020, 0x0010, V::SH, or_empty(ref->study_id));
    put(ds, 0x0020, 0x0011, V::IS, std::to_string(s->series_number));
    put(ds, 0x0020, 0x0013, V::IS, "1");
    put(ds, 0x0020, 0x0052, V::UI, for_uid);
    put(ds, 0x0020, 0x1040, V::LO, "");

    /* Multi-frame Dimension: segment, then position (then time point for 4-D) */
    {
        gdcm::DataSet org;
        put(org, 0x0020, 0x9164, V::UI, dim_org);
        put_seq(ds, 0x0020, 0x9221, {org});
        std::vector<gdcm::DataSet> idx;
        auto dim = [&](uint16_t pg, uint16_t pe, uint16_t fg, uint16_t fe, const char *label) {
            gdcm::DataSet d;
            put(d, 0x0020, 0x9164, V::UI, dim_org);
            put_at(d, 0x0020, 0x9165, pg, pe);
            put_at(d, 0x0020, 0x9167, fg, fe);
            put(d, 0x0020, 0x9421, V::LO, label);
            idx.push_back(d);
        };
        dim(0x0062, 0x000B, 0x0062, 0x000A, "ReferencedSegmentNumber");
        dim(0x0020, 0x0032, 0x0020, 0x9113, "ImagePositionPatient");
        if (temporal)
            dim(0x0020, 0x9128, 0x0020, 0x9111, "TemporalPositionIndex");
        put_seq(ds, 0x0020, 0x9222, idx);
    }

    /* Image Pixel, Segmentation Image */
    const size_t nframes = nsrc * size_t(s->nsegments);
    put_us(ds, 0x0028, 0x0002, {1});
    put(ds, 0x0028, 0x0004, V::CS, "MONOCHROME2");
    put(ds, 0x0028, 0x0008, V::IS, std::to_string(nframes));
    put_us(ds, 0x0028, 0x0010, {uint16_t(s->rows)});
    put_us(ds, 0x0028, 0x0011, {uint16_t(s->columns)});
    put_us(ds, 0x0028, 0x0100, {1});
    put_us(ds, 0x0028, 0x0101, {1});
    put_us(ds, 0x0028, 0x0102, {0});
    put_us(ds, 0x0028, 0x0103, {0});
    put(ds, 0x0028, 0x2110, V::CS, "00");
    put(ds, 0x0062, 0x0001, V::CS, "BINARY");
    {
        std::vector<gdcm::DataSet> segs;
        for (int k = 0; k < s->nsegments; k++) {
            const lc_dicom_seg_segment &sg = s->segments[k];
            gdcm::DataSet d;
            put_seq(d, 0x0062, 0x0003, {code_item(sg.category)});
            put_us(d, 0x0062, 0x0004, {uint16_t(k + 1)});
            put(d, 0x0062, 0x0005, V::LO, or_empty(sg.label));
            put(d, 0x0062, 0x0008, V::CS, "AUTOMATIC");
            put(d, 0x0062, 0x0009, V::LO, sg.algorithm_name ? sg.algorithm_name : "radpipe");
            put_us(d, 0x0062, 0x000D, cielab(sg.rgb));
            put_seq(d, 0x0062, 0x000F, {code_item(sg.type)});
            segs.push_back(d);
        }
        put_seq(ds, 0x0062, 0x0002, segs);
    }
    put(ds, 0x0062, 0x0013, V::CS, "NO");
    put(ds, 0x0070, 0x0080, V::CS, s->content_label ? s->content_label : "SEGMENTATION");
    put(ds, 0x0070, 0x0081, V::LO, or_empty(s->series_description));
    put(ds, 0x0070, 0x0084, V::PN, "");

    /* Common Instance Reference: every source instance once, in first-use order */
    {
        std::vector<gdcm::DataSet> insts;
        std::set<std::string> seen;
        for (size_t i = 0; i < nsrc; i++) {
            const lc_dicom_seg_source &src = s->sources[i];
            if (!seen.insert(src.sop_instance_uid).second)
                continue;
            gdcm::DataSet d;
            put(d, 0x0008, 0x1150, V::UI, src.sop_class_uid);
            put(d, 0x0008, 0x1155, V::UI, src.sop_instance_uid);
            insts.push_back(d);
        }
        gdcm::DataSet series;
        put_seq(series, 0x0008, 0x114A, insts);
        put(series, 0x0020, 0x000E, V::UI, s->source_series_uid);
        put_seq(ds, 0x0008, 0x1115, {series});
    }

    /* Shared functional groups: orientation and pixel measures */
    {
        gdcm::DataSet orient, measures, shared;
        put(orient, 0x0020, 0x0037, V::DS, ds_list(s->iop, 6));
        put(measures, 0x0018, 0x0050, V::DS, ds_str(s->slice_thickness));
        put(measures, 0x0028, 0x0030, V::DS, ds_list(s->pixel_spacing, 2));
        put_seq(shared, 0x0020, 0x9116, {orient});
        put_seq(shared, 0x0028, 0x9110, {measures});
        put_seq(ds, 0x5200, 0x9229, {shared});
    }

    /* Per-frame functional groups and the bit-packed frames, segment-major: frame
     * (k, i) shows segment k+1 on source frame i */
    auto tindex = [](const lc_dicom_seg_source &x) {
        return x.temporal_index > 0 ? x.temporal_index : 1;
    };
    std::vector<uint32_t> pos_in_t(nsrc, 1);
    if (temporal) {
        std::map<long, uint32_t> seen_t;
        for (size_t i = 0; i < nsrc; i++)
            pos_in_t[i] = ++seen_t[tindex(s->sources[i])];
    }
    std::vector<gdcm::DataSet> frames;
    frames.reserve(nframes);
    std::vector<uint8_t> bits((nframes * plane + 7) / 8 + 1, 0);
    size_t bit = 0;
    gdcm::DataSet purpose =
        code_item({"121322", "DCM", "Source image for image processing operation"});
    gdcm::DataSet derivation = code_item({"113076", "DCM", "Segmentation"});
    for (int k = 0; k < s->nsegments; k++) {
        for (size_t i = 0; i < nsrc; i++) {
            const lc_dicom_seg_source &src = s->sources[i];
            gdcm::DataSet fr, srcimg, deriv, content, pos, segid;
            put(srcimg, 0x0008, 0x1150, V::UI, src.sop_class_uid);
            put(srcimg, 0x0008, 0x1155, V::UI, src.sop_instance_uid);
            if (src.frame_number > 0)
                put(srcimg, 0x0008, 0x1160, V::IS, std::to_string(src.frame_number));
            put(srcimg, 0x0028, 0x135A, V::CS, "YES");
            put_seq(srcimg, 0x0040, 0xA170, {purpose});
            put_seq(deriv, 0x0008, 0x2112, {srcimg});
            put_seq(deriv, 0x0008, 0x9215, {derivation});
            put_seq(fr, 0x0008, 0x9124, {deriv});
            std::vector<uint32_t> dimv = {uint32_t(k + 1), uint32_t(i + 1)};
            if (temporal) {
                /* in-stack position within its time point, then the time point */
                dimv = {uint32_t(k + 1), pos_in_t[i], uint32_t(tindex(src))};
                put_ul(content, 0x0020, 0x9128, {uint32_t(tindex(src))});
            }
            put_ul(content, 0x0020, 0x9157, dimv);
            put_seq(fr, 0x0020, 0x9111, {content});
            put(pos, 0x0020, 0x0032, V::DS, ds_list(src.ipp, 3));
            put_seq(fr, 0x0020, 0x9113, {pos});
            put_us(segid, 0x0062, 0x000B, {uint16_t(k + 1)});
            put_seq(fr, 0x0062, 0x000A, {segid});
            frames.push_back(fr);
            const uint8_t *lab = s->labels + i * plane;
            const uint8_t want = uint8_t(k + 1);
            for (size_t p = 0; p < plane; p++, bit++)
                if (lab[p] == want)
                    bits[bit >> 3] |= uint8_t(1u << (bit & 7));
        }
    }
    put_seq(ds, 0x5200, 0x9230, frames);
    size_t nbytes = (nframes * plane + 7) / 8;
    if (nbytes % 2)
        nbytes++;
    put_binary(ds, 0x7FE0, 0x0010, V::OB, bits.data(), nbytes);

    gdcm::Writer w;
    std::ostringstream os;
    w.SetStream(os);
    w.GetFile().SetDataSet(ds);
    w.GetFile().GetHeader().SetDataSetTransferSyntax(gdcm::TransferSyntax::ExplicitVRLittleEndian);
    if (!w.Write())
        return lc_err_set(err, LC_ERR_INTERNAL, "GDCM could not write the segmentation");
    out = os.str();
    return LC_OK;
}

} // namespace

/* ---- C API ------------------------------------------------------------------------------- */

lc_rc lc_dicom_read_image_info(const char *path, lc_dicom_image_info **out, lc_err *err)
{
    *out = nullptr;
    lc_dicom_image_info *info = (lc_dicom_image_info *)calloc(1, sizeof(*info));
    if (!info)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    lc_rc rc = lc_dicom_read_header(path, &info->hdr, err);
    if (rc == LC_OK) {
        try {
            rc = read_info(path, info, err);
        } catch (const std::bad_alloc &) {
            rc = lc_err_set(err, LC_ERR_NOMEM, "out of memory reading \"%s\"", path);
        } catch (const std::exception &e) {
            rc = lc_err_set(err, LC_ERR_DICOM, "could not parse \"%s\": %s", path, e.what());
        } catch (...) {
            rc = lc_err_set(err, LC_ERR_DICOM, "could not parse \"%s\": unknown error", path);
        }
    }
    if (rc != LC_OK) {
        lc_dicom_image_info_free(info);
        return rc;
    }
    *out = info;
    return LC_OK;
}

void lc_dicom_image_info_free(lc_dicom_image_info *info)
{
    if (!info)
        return;
    lc_dicom_header_free(info->hdr);
    free(info->frames);
    free(info->frame_of_reference_uid);
    free(info->mr_acquisition_type);
    free(info->manufacturer);
    free(info->acquisition_time);
    free(info);
}

void lc_dicom_seg_new_uid(char out[65])
{
    uint8_t r[16];
    size_t got = 0;
    while (got < sizeof(r)) { /* getrandom of 16 bytes only fails before the pool is ready */
        ssize_t n = getrandom(r + got, sizeof(r) - got, 0);
        if (n > 0)
            got += size_t(n);
    }
    /* the 128-bit number in decimal: repeated division of the big-endian bytes by 10 */
    char digits[48];
    int nd = 0;
    bool zero;
    do {
        unsigned rem = 0;
        zero = true;
        for (size_t i = 0; i < sizeof(r); i++) {
            unsigned cur = rem * 256 + r[i];
            r[i] = uint8_t(cur / 10);
            rem = cur % 10;
            zero = zero && r[i] == 0;
        }
        digits[nd++] = char('0' + rem);
    } while (!zero);
    int o = snprintf(out, 65, "2.25.");
    while (nd > 0)
        out[o++] = digits[--nd];
    out[o] = '\0';
}

lc_rc lc_dicom_seg_write(const lc_dicom_seg_spec *spec, void **buf, size_t *len, char sop_uid[65],
                         char series_uid[65], lc_err *err)
{
    *buf = nullptr;
    *len = 0;
    lc_rc rc = check_spec(spec, err);
    if (rc != LC_OK)
        return rc;
    try {
        std::string out;
        rc = write_seg(spec, out, sop_uid, series_uid, err);
        if (rc != LC_OK)
            return rc;
        void *p = malloc(out.size() ? out.size() : 1);
        if (!p)
            return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
        memcpy(p, out.data(), out.size());
        *buf = p;
        *len = out.size();
        return LC_OK;
    } catch (const std::bad_alloc &) {
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory writing the segmentation");
    } catch (const std::exception &e) {
        return lc_err_set(err, LC_ERR_INTERNAL, "could not write the segmentation: %s", e.what());
    } catch (...) {
        return lc_err_set(err, LC_ERR_INTERNAL, "could not write the segmentation: unknown error");
    }
}
