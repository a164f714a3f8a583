/*
 * ref_par.h: the CPU reference's parallel loop: a voxel range split into contiguous parts, one
 * pthread per part (the calling thread runs part 0), joined before returning.
 * Part boundaries depend only on n and the part count, never on timing, so every per-part
 * result is deterministic; callers merge parts in part order. Thread-safe (no shared state).
 */
#ifndef REF_PAR_H
#define REF_PAR_H

#include <stddef.h>

/* Voxels a part gets at least: below this a thread costs more than it saves. */
#define REF_MIN_PART 16384
/* Threads used at most, however many are asked for. */
#define REF_MAX_THREADS 256

/* fn(arg, part, begin, end) for the half-open voxel range [begin, end) of part `part`. */
typedef void (*ref_part_fn)(void *arg, int part, size_t begin, size_t end);

/* How many parts ref_run uses for n voxels with up to threads threads (1..threads). */
int ref_parts(int threads, size_t n);
/* Runs fn over [0, n) in ref_parts(threads, n) parts. When a thread cannot be started its part
 * runs on the calling thread instead, so this never fails. */
void ref_run(int threads, size_t n, ref_part_fn fn, void *arg);

/* The same over `units` work units (rows, slices) with at least min_units per part (>= 1) and
 * no alignment: parts get units / nparts each, the last part the remainder. ref_units_parts
 * says how many parts ref_run_units uses; part boundaries depend only on its arguments. */
int ref_units_parts(int threads, size_t units, size_t min_units);
void ref_run_units(int threads, size_t units, size_t min_units, ref_part_fn fn, void *arg);

#endif
