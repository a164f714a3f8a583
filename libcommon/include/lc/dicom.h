/*
 * dicom.h: the C face of GDCM (implemented in dicom.cc, the one C++ file of libcommon).
 * Header parsing stops before Pixel Data; string values come out as UTF-8 decoded from the
 * file's Specific Character Set; pixel reading decodes every transfer syntax GDCM supports.
 * All functions are reentrant; results are owned by the caller (free with the _free calls).
 * GDCM exceptions never cross this boundary: they become LC_ERR_DICOM with a message.
 */
#ifndef LC_DICOM_H
#define LC_DICOM_H

#include <stddef.h>
#include "lc/rc.h"

typedef struct lc_dicom_header {
    /* identity; UIDs are never NULL on success (a file without them is rejected) */
    char *sop_class_uid;
    char *sop_instance_uid;
    char *study_instance_uid;
    char *series_instance_uid;
    char *transfer_syntax_uid; /* "" when the file has no meta header (implicit LE assumed) */
    char *specific_character_set;
    /* patient and study (UTF-8; NULL when absent) */
    char *patient_name; /* DICOM PN form: "Family^Given^Middle^Prefix^Suffix" */
    char *patient_id;
    char *patient_birth_date;
    char *patient_sex;
    char *study_date; /* YYYYMMDD as stored */
    char *study_time;
    char *accession_number;
    char *study_id;
    char *study_description;
    char *referring_physician_name;
    /* series and instance */
    char *modality;
    char *series_description;
    char *body_part_examined;
    int series_number;   /* 0 when absent */
    int instance_number; /* 0 when absent */
    /* image geometry; has_* say whether the attribute was present and well-formed */
    int rows, columns, number_of_frames; /* frames 1 when absent and rows > 0 */
    int samples_per_pixel, bits_allocated, bits_stored, pixel_representation;
    char *photometric_interpretation;
    int has_ipp, has_iop, has_pixel_spacing, has_slice_thickness;
    double ipp[3];           /* ImagePositionPatient */
    double iop[6];           /* ImageOrientationPatient: row cosines then column cosines */
    double pixel_spacing[2]; /* row spacing, column spacing (mm) */
    double slice_thickness;
    double rescale_slope, rescale_intercept; /* 1 and 0 when absent */
    int images_in_acquisition;               /* 0 when absent */
    int number_of_temporal_positions;        /* 0 when absent */
    int has_pixel_data;
} lc_dicom_header;

/* Parse the header of a DICOM file (Part 10 with or without preamble, or a bare dataset).
 * LC_ERR_DICOM when it is not DICOM, is truncated before the required identity attributes, or
 * lacks StudyInstanceUID/SeriesInstanceUID/SOPInstanceUID. */
lc_rc lc_dicom_read_header(const char *path, lc_dicom_header **out, lc_err *err);
/* Same from memory (for fuzzing and HTTP bodies already in memory). */
lc_rc lc_dicom_read_header_buf(const void *buf, size_t len, lc_dicom_header **out, lc_err *err);
void lc_dicom_header_free(lc_dicom_header *h);

/* Decode the pixel data of a single-sample (grayscale) image into float32 with
 * RescaleSlope/Intercept applied: rows*columns*frames values, frame-major then row-major.
 * LC_ERR_UNSUPPORTED for colour images; LC_ERR_DICOM when decoding fails. Caller frees *out. */
lc_rc lc_dicom_read_pixels_f32(const char *path, float **out, int *rows, int *columns, int *frames,
                               lc_err *err);

/* Decode bytes in charset (the DICOM Specific Character Set value, e.g. "ISO_IR 100",
 * "ISO 2022 IR 6\\ISO 2022 IR 87", or NULL/"" for the default repertoire) to UTF-8. Invalid
 * sequences become U+FFFD. Caller frees. NULL only on allocation failure. */
char *lc_dicom_to_utf8(const char *bytes, size_t len, const char *charset);

/* 1 when uid is a syntactically valid DICOM UID: 1..64 characters of digits and dots, no
 * empty component, no leading zero in a multi-digit component. */
int lc_dicom_uid_valid(const char *uid);

#endif
