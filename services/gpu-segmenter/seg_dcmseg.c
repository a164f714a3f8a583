/*
 * seg_dcmseg.c: the mask as a binary DICOM Segmentation through lc_dicom_seg_write: one
 * segment, coded by algorithm with SNOMED CT (the body outline: Anatomical Structure / Entire
 * body; Otsu and HU ranges: Tissue / Tissue), one frame per slice (and time point),
 * each referencing its source instance (and frame). Pure function; thread-safe.
 */
#include <stdio.h>
#include <stdlib.h>
#include "seg.h"

lc_rc seg_dcmseg_build(const seg_volume *v, const uint8_t *mask, const seg_params *p,
                       void **buf, size_t *len, char sop_uid[65], lc_err *err)
{
    char series_uid[65], desc[96];
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
        .segments = &seg,
        .nsegments = 1,
        .labels = mask,
        .series_description = desc,
        .series_number = 9901,
        .content_label = p->algorithm == SEG_ALGO_BODY ? "BODY" : "SEGMENTATION",
        .software_version = "radpipe 1",
    };
    lc_rc rc = lc_dicom_seg_write(&spec, buf, len, sop_uid, series_uid, err);
    free(src);
    return rc;
}
