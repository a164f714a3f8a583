/*
 * dicom.h: radpipe's DICOM layer (C++ behind a C API: libcommon/dicom*.cc). Every input is
 * walked and bounds-checked first; headers are then read straight from the checked bytes (up
 * to Pixel Data), string values come out as UTF-8 decoded from the file's Specific Character
 * Set, the whole header can come out as DICOM JSON (PS3.18 Annex F), and pixel reading decodes
 * every transfer syntax GDCM supports. All functions are reentrant; results are owned by the
 * caller (free with the _free calls). No C++ exception crosses this boundary.
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
    /* more QIDO-RS attributes (PS3.18 10.6.3.3) and the index's columns (proto/sql/002) */
    char *issuer_of_patient_id;            /* (0010,0021) */
    char *institution_name;                /* (0008,0080) */
    char *timezone_offset;                 /* (0008,0201) TimezoneOffsetFromUTC, "+hhmm" */
    char *series_date, *series_time;       /* (0008,0021), (0008,0031) */
    char *content_date, *content_time;     /* (0008,0023), (0008,0033) */
    char *pps_start_date, *pps_start_time; /* PerformedProcedureStepStart (0040,0244/0245) */
    char *scheduled_procedure_step_id;     /* first RequestAttributesSequence item (0040,0009) */
    char *requested_procedure_id;          /* first RequestAttributesSequence item (0040,1001) */
    char *request_attributes; /* RequestAttributesSequence (0040,0275) as a JSON array of DICOM
                                 JSON items; NULL when absent */
    int high_bit;             /* (0028,0102); -1 when absent */
    /* with LC_DICOM_JSON: the whole data set as DICOM JSON (see below); else NULL */
    char *json;
    size_t json_len;
    /* with LC_DICOM_SHA256 (files only): SHA-256 (hex) and size of the whole file */
    char sha256[65];
    long long file_size;
} lc_dicom_header;

/* Flags of lc_dicom_read_header_ex. */
enum {
    /* Also produce h->json: the data set as a DICOM JSON object (PS3.18 F.2): keys "GGGGEEEE"
     * (upper-case hex), values {"vr": VR, "Value": [...]}; PN values {"Alphabetic",
     * "Ideographic", "Phonetic"}; IS/DS/US/SS/UL/SL/FL/FD as numbers (text that is no number
     * stays a string; NaN becomes null); AT as "GGGGEEEE"; SQ items as nested objects (an item
     * may carry its own character set). Binary values (OB OD OF OL OV OW UN) of up to
     * LC_DICOM_JSON_INLINE_MAX bytes as "InlineBinary" (base64, little endian), larger ones
     * (and any value over 64 KiB) as "BulkDataURI": "bulk/<tag>[/<item>/<tag>...]",
     * relative to the instance's WADO-RS URL, for the gateway to resolve. Left out: file meta
     * information (0002), group lengths, Pixel Data (7FE0,0008/0009/0010), trailing padding,
     * repeated tags after their first occurrence. Implicit VR elements and UN values of public
     * tags get the dictionary's VR. */
    LC_DICOM_JSON = 1u << 0,
    /* Hash the whole file while reading it (h->sha256, h->file_size): one pass over the
     * bytes instead of two. Ignored by the _buf variant. */
    LC_DICOM_SHA256 = 1u << 1,
};
#define LC_DICOM_JSON_INLINE_MAX 1024
/* The largest DICOM JSON document produced; a header that needs more is refused. */
#define LC_DICOM_JSON_MAX (32u << 20)

/* Parse the header of a DICOM file (Part 10 with or without preamble, or a bare dataset).
 * LC_ERR_DICOM when it is not DICOM, is truncated before the required identity attributes, or
 * lacks StudyInstanceUID/SeriesInstanceUID/SOPInstanceUID. */
lc_rc lc_dicom_read_header(const char *path, lc_dicom_header **out, lc_err *err);
/* Same from memory (for fuzzing and HTTP bodies already in memory). */
lc_rc lc_dicom_read_header_buf(const void *buf, size_t len, lc_dicom_header **out, lc_err *err);
/* The same with LC_DICOM_* flags. */
lc_rc lc_dicom_read_header_ex(const char *path, unsigned flags, lc_dicom_header **out, lc_err *err);
lc_rc lc_dicom_read_header_buf_ex(const void *buf, size_t len, unsigned flags,
                                  lc_dicom_header **out, lc_err *err);
void lc_dicom_header_free(lc_dicom_header *h);

/* The tag ((group << 16) | element) and VR of a DICOM keyword of the public dictionary
 * ("PatientID" -> 0x00100020, "LO"), from GDCM's dictionary; ambiguous VRs give their first
 * choice ("US or SS" -> "US", "OB or OW" -> "OW"). tag and vr may be NULL. LC_ERR_NOT_FOUND
 * for an unknown keyword (keywords are case-sensitive). */
lc_rc lc_dicom_keyword_tag(const char *keyword, unsigned *tag, char vr[3]);

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
