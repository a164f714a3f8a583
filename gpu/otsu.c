/*
 * otsu.c: Otsu's threshold from a histogram, on the host for every backend (the histogram is
 * small; only it crosses from the device). Follows scikit-image's threshold_otsu step by step
 * (cumulative sums from both ends, bin centres, first maximum) so results are comparable.
 * Stateless and thread-safe.
 */
#include <stdlib.h>
#include "gpu_internal.h"

lc_rc gpu_otsu_from_hist(const uint64_t *hist, int nbins, float lo, float hi, float *threshold,
                         lc_err *err)
{
    lc_rc rc = LC_OK;
    double *w2 = NULL, *s2 = NULL; /* weight and weighted sum of bins [k..nbins-1] */
    double width = ((double)hi - (double)lo) / nbins;
    double w1 = 0, s1 = 0, best = -1;
    int best_k = 0;

    if (nbins < 2)
        return lc_err_set(err, LC_ERR_INVALID, "invalid Otsu bin count %d: need 2 or more", nbins);
    w2 = malloc((size_t)nbins * sizeof(*w2));
    s2 = malloc((size_t)nbins * sizeof(*s2));
    if (!w2 || !s2) {
        rc = lc_err_set(err, LC_ERR_NOMEM, "could not allocate Otsu sums for %d bins", nbins);
        goto out;
    }
    /* Suffix sums computed from the right, as scikit-image does, rather than total minus the
     * prefix: the subtraction would cancel badly when one class is tiny. */
    for (int k = nbins - 1; k >= 0; k--) {
        double c = (double)hist[k];
        double centre = (double)lo + (k + 0.5) * width;
        w2[k] = c + (k + 1 < nbins ? w2[k + 1] : 0);
        s2[k] = c * centre + (k + 1 < nbins ? s2[k + 1] : 0);
    }
    /* Threshold after bin k: class 1 = bins [0..k], class 2 = [k+1..]. */
    for (int k = 0; k + 1 < nbins; k++) {
        double c = (double)hist[k];
        w1 += c;
        s1 += c * ((double)lo + (k + 0.5) * width);
        if (w1 == 0 || w2[k + 1] == 0)
            continue; /* an empty class has no mean (cannot happen between min and max) */
        double d = s1 / w1 - s2[k + 1] / w2[k + 1];
        double var = w1 * w2[k + 1] * d * d;
        if (var > best) {
            best = var;
            best_k = k;
        }
    }
    *threshold = (float)((double)lo + (best_k + 0.5) * width);
out:
    free(w2);
    free(s2);
    return rc;
}
