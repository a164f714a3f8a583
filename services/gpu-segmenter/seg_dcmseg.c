/*
 * seg_dcmseg.c: the mask as a binary DICOM Segmentation through lc_dicom_seg_write. An
 * algorithm's mask is one segment, coded by algorithm with SNOMED CT (the body outline:
 * Anatomical Structure / Entire body; Otsu and HU ranges: Tissue / Tissue); a model's label
 * map is one segment per model label, coded as its model.json says. One frame per segment and
 * slice (and time point), each referencing its source instance (and frame). Pure functions;
 * thread-safe.
 */
#include <stdio.h>
#include <stdlib.h>
#include "seg.h"

static lc_rc build(const seg_volume *v, const uint8_t *labels, const lc_dicom_seg_segment *segs,
                   int nsegs, const char *desc, const char *content_label, void **buf, size_t *len,
                   char sop_uid[65], lc_err *err)
{
    char series_uid[65];
    size_t ns = v->nz * v->nt;
    if (ns > 2147483647u)
        return lc_err_set(err, LC_ERR_TOO_LARGE, "too many slices for a segmentation");
    lc_dicom_seg_source *src = calloc(ns, sizeof(*src));
    if (!src)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    for (size_t s = 0; s < ns; s++) {
        const seg_slice *sl = &v->slices[s];
        src[s].sop_class_uid = sl->sop_class_uid;
        src[s].sop_instance_uid = sl->sop_uid;
        src[s].frame_number = sl->frame;
        src[s].ipp[0] = sl->ipp[0];
        src[s].ipp[1] = sl->ipp[1];
        src[s].ipp[2] = sl->ipp[2];
        src[s].temporal_index = sl->temporal;
    }
    lc_dicom_seg_spec spec = {
        .ref = v->ref,
        .source_series_uid = v->series_uid,
        .frame_of_reference_uid = v->frame_of_reference_uid,
        .rows = (int)v->ny,
        .columns = (int)v->nx,
        .nsources = (int)ns,
        .sources = src,
        .iop = {v->iop[0], v->iop[1], v->iop[2], v->iop[3], v->iop[4], v->iop[5]},
        .pixel_spacing = {v->spacing[1], v->spacing[0]},
        .slice_thickness = v->slice_thickness,
        .segments = segs,
        .nsegments = nsegs,
        .labels = labels,
        .series_description = desc,
        .series_number = 9901,
        .content_label = content_label,
        .software_version = "radpipe 1",
    };
    lc_rc rc = lc_dicom_seg_write(&spec, buf, len, sop_uid, series_uid, err);
    free(src);
    return rc;
}

lc_rc seg_dcmseg_build(const seg_volume *v, const uint8_t *mask, const seg_params *p, void **buf,
                       size_t *len, char sop_uid[65], lc_err *err)
{
    char desc[96];
    lc_dicom_seg_segment seg = {
        .label = p->label,
        .algorithm_name = "radpipe gpu-segmenter",
        .category = {"85756007", "SCT", "Tissue"},
        .type = {"85756007", "SCT", "Tissue"},
        .rgb = {255, 64, 64},
    };
    if (p->algorithm == SEG_ALGO_BODY) {
        seg.category = (lc_dicom_code){"123037004", "SCT", "Anatomical Structure"};
        seg.type = (lc_dicom_code){"38266002", "SCT", "Entire body"};
        seg.rgb[0] = 255;
        seg.rgb[1] = 200;
        seg.rgb[2] = 0;
    }
    snprintf(desc, sizeof(desc), "radpipe %s segmentation", seg_algorithm_name(p->algorithm));
    return build(v, mask, &seg, 1, desc, p->algorithm == SEG_ALGO_BODY ? "BODY" : "SEGMENTATION",
                 buf, len, sop_uid, err);
}

lc_rc seg_dcmseg_build_model(const seg_volume *v, const uint8_t *labels, const seg_model *m,
                             void **buf, size_t *len, char sop_uid[65], lc_err *err)
{
    const seg_model_desc *d = &m->d;
    char desc[64], algo[64];
    lc_dicom_seg_segment *segs = calloc((size_t)d->nlabels, sizeof(*segs));
    if (!segs)
        return lc_err_set(err, LC_ERR_NOMEM, "out of memory");
    /* LO values: at most 64 characters */
    snprintf(algo, sizeof(algo), "radpipe %.30s %.24s", d->name, d->version);
    snprintf(desc, sizeof(desc), "radpipe %.55s", d->name);
    for (int i = 0; i < d->nlabels; i++) {
        const seg_model_label *l = &d->labels[i]; /* labels[i].value == i + 1 */
        segs[i] = (lc_dicom_seg_segment){
            .label = l->name,
            .algorithm_name = algo,
            .category = {l->category.code, l->category.scheme, l->category.meaning},
            .type = {l->type.code, l->type.scheme, l->type.meaning},
            .rgb = {l->rgb[0], l->rgb[1], l->rgb[2]},
        };
    }
    lc_rc rc = build(v, labels, segs, d->nlabels, desc, "SEGMENTATION", buf, len, sop_uid, err);
    free(segs);
    return rc;
}
