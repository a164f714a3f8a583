/*
 * bench_header.c FILE...: header-parse rate of lc_dicom_read_header (GDCM, up to Pixel Data)
 * over the given files, repeated until at least 2 s have passed; prints one line
 * "ours_files_per_s=<rate> files=<n> passes=<k>". run.sh compares it with pydicom on the
 * same files in the same run.
 */
#include <stdio.h>
#include <stdlib.h>
#include "lc/dicom.h"
#include "lc/log.h"
#include "lc/util.h"

int main(int argc, char **argv)
{
    lc_log_init("bench_header", LC_LOG_ERROR);
    if (argc < 2) {
        fprintf(stderr, "usage: bench_header FILE...\n");
        return 2;
    }
    long parsed = 0, failed = 0;
    int passes = 0;
    int64_t t0 = lc_now_ms();
    do {
        for (int i = 1; i < argc; i++) {
            lc_dicom_header *h = NULL;
            lc_err e;
            if (lc_dicom_read_header(argv[i], &h, &e) == LC_OK)
                parsed++;
            else
                failed++;
            lc_dicom_header_free(h);
        }
        passes++;
    } while (lc_now_ms() - t0 < 2000);
    double secs = (double)(lc_now_ms() - t0) / 1000.0;
    printf("ours_files_per_s=%.1f files=%d passes=%d failed=%ld\n", (double)parsed / secs, argc - 1,
           passes, failed / passes);
    return 0;
}
