/*
 * fuzz_dicom_header.c: libFuzzer target for lc_dicom_read_header_buf (the indexer and the
 * gateway parse untrusted uploads with it). Any input must give LC_OK with a header that
 * holds its invariants, or an error with a message; never a crash, a leak or a hang.
 * Seeds: tests/data/ and the shared corpus (malformed/, charsets/, syntaxes/mr-small-matrix/).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "lc/dicom.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    lc_dicom_header *h = NULL;
    lc_err err;
    memset(&err, 0, sizeof(err));
    lc_rc rc = lc_dicom_read_header_buf(data, size, &h, &err);
    if (rc == LC_OK) {
        /* the contract: identity UIDs are never NULL on success */
        if (!h || !h->study_instance_uid || !h->series_instance_uid || !h->sop_instance_uid ||
            !h->transfer_syntax_uid || !h->sop_class_uid || !h->specific_character_set)
            abort();
        /* strings come out as UTF-8: converting again with ISO_IR 192 must not change them */
        if (h->patient_name) {
            char *again = lc_dicom_to_utf8(h->patient_name, strlen(h->patient_name), "ISO_IR 192");
            if (!again || strcmp(again, h->patient_name) != 0)
                abort();
            free(again);
        }
        lc_dicom_header_free(h);
    } else if (h != NULL || err.msg[0] == '\0') {
        abort();
    }
    return 0;
}
