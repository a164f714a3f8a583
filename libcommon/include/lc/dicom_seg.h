/*
 * dicom_seg.h: what the segmenter needs from DICOM beyond lc/dicom.h, through GDCM
 * (dicom_seg.cc, owned by the segmenter): the geometry of every frame of an image object
 * (classic single-frame, or enhanced multi-frame with per-frame and shared functional
 * groups), and writing a binary DICOM Segmentation object that references its source frames.
 * Files are handed to GDCM only after lc_dicom_read_header accepted them. Reentrant; results
 * are owned by the caller (free with the _free calls).
 */
#ifndef LC_DICOM_SEG_H
#define LC_DICOM_SEG_H

#include <stddef.h>
#include <stdint.h>
#include "lc/rc.h"

#ifdef __cplusplus
extern "C" {
#endif

#include "lc/dicom.h" /* no C++ guards of its own */

/* The geometry of one frame; for a single-frame object the top-level attributes. */
typedef struct lc_dicom_frame_geom {
    int has_ipp, has_iop, has_spacing;
    double ipp[3];           /* ImagePositionPatient (LPS, mm) */
    double iop[6];           /* ImageOrientationPatient: row cosines, then column cosines */
    double pixel_spacing[2]; /* row spacing, column spacing (mm) */
    double slice_thickness;  /* 0 when absent */
    double rescale_slope, rescale_intercept; /* 1 and 0 when absent */
    long temporal_index; /* TemporalPositionIndex / TemporalPositionIdentifier; 0 when absent */
} lc_dicom_frame_geom;

typedef struct lc_dicom_image_info {
    lc_dicom_header *hdr;         /* owned: the header as lc_dicom_read_header parsed it */
    int nframes;                  /* = hdr->number_of_frames (1 for a single-frame image) */
    lc_dicom_frame_geom *frames;  /* nframes entries, in frame order */
    int enhanced;                 /* 1 when per-frame functional groups were present */
    char *frame_of_reference_uid; /* NULL when absent */
    char *mr_acquisition_type;    /* "2D", "3D" or NULL */
    char *manufacturer;           /* NULL when absent */
    char *acquisition_time;       /* AcquisitionTime as stored, NULL when absent */
    double gantry_tilt;           /* GantryDetectorTilt in degrees, 0 when absent */
} lc_dicom_image_info;

/* Parse path (lc_dicom_read_header first, then GDCM up to Pixel Data) and return the geometry
 * of each frame. LC_ERR_DICOM when the file is not DICOM; a frame without geometry is not an
 * error (has_* are 0). *out: free with lc_dicom_image_info_free. */
lc_rc lc_dicom_read_image_info(const char *path, lc_dicom_image_info **out, lc_err *err);
void lc_dicom_image_info_free(lc_dicom_image_info *info); /* accepts NULL */

/* A new UID "2.25.<128 random bits in decimal>" (ITU-T X.667), at most 44 characters. */
void lc_dicom_seg_new_uid(char out[65]);

/* A coded concept: CodeValue, CodingSchemeDesignator, CodeMeaning (all borrowed). */
typedef struct lc_dicom_code {
    const char *value, *scheme, *meaning;
} lc_dicom_code;

typedef struct lc_dicom_seg_segment {
    const char *label;          /* SegmentLabel (LO, <= 64 characters) */
    const char *algorithm_name; /* SegmentAlgorithmName (AUTOMATIC algorithm) */
    lc_dicom_code category;     /* SegmentedPropertyCategoryCodeSequence */
    lc_dicom_code type;         /* SegmentedPropertyTypeCodeSequence */
    int rgb[3];                 /* display colour (sRGB 0..255), written as CIELab */
} lc_dicom_seg_segment;

/* One source frame of the segmented volume (a slice). */
typedef struct lc_dicom_seg_source {
    const char *sop_class_uid, *sop_instance_uid; /* borrowed */
    int frame_number;    /* 1-based frame of a multi-frame source; 0 for a single-frame one */
    double ipp[3];       /* the frame's ImagePositionPatient */
    long temporal_index; /* 1-based time point of a 4-D series; 0 for 3-D */
} lc_dicom_seg_source;

typedef struct lc_dicom_seg_spec {
    const lc_dicom_header *ref; /* patient and study attributes are copied from it (borrowed) */
    const char *source_series_uid;
    const char *frame_of_reference_uid; /* may be NULL: a new one is made */
    int rows, columns, nsources;
    const lc_dicom_seg_source *sources; /* nsources */
    double iop[6], pixel_spacing[2];
    double slice_thickness; /* > 0 */
    const lc_dicom_seg_segment *segments;
    int nsegments; /* 1..255 */
    /* rows*columns*nsources labels, source-major then row-major: 0 = background, s = the
     * s-th segment (1-based). Values above nsegments are an error. */
    const uint8_t *labels;
    const char *series_description; /* may be NULL */
    int series_number;
    const char *content_label;    /* ContentLabel (CS: uppercase, <= 16) */
    const char *software_version; /* SoftwareVersions */
} lc_dicom_seg_spec;

/* Write a binary Segmentation (SOP class 1.2.840.10008.5.1.4.1.1.66.4, explicit VR little
 * endian): one frame per segment and source frame, with per-frame functional groups
 * (derivation image -> source instance and frame, plane position, segment identification,
 * dimension indices) and the Common Instance Reference to every source instance. *buf (caller
 * frees) holds the Part 10 file; sop_uid and series_uid receive the new UIDs. */
lc_rc lc_dicom_seg_write(const lc_dicom_seg_spec *spec, void **buf, size_t *len, char sop_uid[65],
                         char series_uid[65], lc_err *err);

#ifdef __cplusplus
}
#endif

#endif
