/* The CPU hot spots of the OBS column sweep, compiled (see native.py): one block of the sweep
 * with a known mask (or N:M masks, which depend on each row of W alone), the choice of a
 * block's unstructured mask, and the transposes into and out of the W^T layout (the last two
 * after the sweep); and GPTQ's mse grid search (at the end of this file).
 *
 * The block is Wt[0:width, 0:cols] of W^T (rows = columns of W). With the block's mask
 * known, or chosen per row of W (N:M), the columns of Wt (rows of W) are independent and each
 * one runs the column loop
 *
 *     for j: e_j = m_j * w_j;  w_j -= e_j;  w_k -= N_jk * e_j  for k > j,
 *
 * N the strictly upper part of the block's T^-1 (passed transposed, as L = N^T, so that the
 * coefficients a row k receives are contiguous): what the Python loop in sweep.py does,
 * without its per-column dispatch cost.
 *
 * The work is done on tiles of LANES adjacent columns of Wt, held as vectors (one vector per
 * row of the block, so a lane is a row of W). Updates are blocked by SUB rows: the SUB x SUB
 * triangle is solved in registers, then each later row k of the block is loaded once, receives
 * the SUB updates, and is stored once. Each w_k still receives its updates one at a time in
 * ascending j, so, compiled without floating point contraction, the results equal the eager
 * column loop bit for bit, on every instruction set and for any number of threads. */

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define SUB 16

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));

/* N:M masks of one group for every lane: of the prunem entries x[0..prunem-1] (current
 * values), the prunen with the smallest scores (x * x) * r2[i], ties to the lower index: an
 * entry is pruned when fewer than prunen come before it in the order (score, index), the rule
 * of masks.smallest. m receives 1.0f (pruned) or +0.0f. */
static inline void choose_group(const vf *x, vf *m, const float *r2, int prunen, int prunem)
{
    vf score[SUB];
    for (int i = 0; i < prunem; ++i)
        score[i] = (x[i] * x[i]) * r2[i];
    const vi one = (vi)((vf){0} + 1.0f); /* the bit pattern of 1.0f in every lane */
    for (int i = 0; i < prunem; ++i) {
        vi before = {0};
        for (int j = 0; j < prunem; ++j) {
            if (j < i)
                before -= score[j] <= score[i]; /* comparisons give -1 where true */
            else if (j > i)
                before -= score[j] < score[i];
        }
        m[i] = (vf)((before < prunen) & one);
    }
}

/* t[j]: the tile's values of row j of the block; m[j]: its 0/1 mask (1 = pruned), replaced by
 * the errors e_j. L[k * width + j] = N_jk. With prunem > 0 (a divisor of SUB), the masks of each
 * group of prunem rows are chosen from the current values when its first row is reached
 * (r2: the block's r_j^2); always inlined, so that the unstructured case (prunem == 0) is
 * compiled without the group code. */
static inline __attribute__((always_inline)) void sweep_tile(vf *t, vf *m, const float *L, int width,
                                                             const float *r2, int prunen, int prunem)
{
    for (int s = 0; s < width; s += SUB) {
        const int sub = width - s < SUB ? width - s : SUB;
        vf e[SUB];
        if (sub == SUB) { /* constant trip counts: the triangle and the errors stay in registers */
            vf v[SUB];
            for (int j = 0; j < SUB; ++j)
                v[j] = t[s + j];
            for (int j = 0; j < SUB; ++j) {
                if (prunem && j % prunem == 0)
                    choose_group(v + j, m + s + j, r2 + s + j, prunen, prunem);
                e[j] = v[j] * m[s + j];
                v[j] -= e[j];
                for (int k = j + 1; k < SUB; ++k)
                    v[k] -= L[(ptrdiff_t)(s + k) * width + s + j] * e[j];
            }
            for (int j = 0; j < SUB; ++j) {
                t[s + j] = v[j];
                m[s + j] = e[j];
            }
            for (int k = s + SUB; k < width; ++k) {
                const float *lk = L + (ptrdiff_t)k * width + s;
                vf acc = t[k];
                for (int j = 0; j < SUB; ++j)
                    acc -= lk[j] * e[j];
                t[k] = acc;
            }
        } else {
            for (int j = 0; j < sub; ++j) {
                if (prunem && j % prunem == 0)
                    choose_group(t + s + j, m + s + j, r2 + s + j, prunen, prunem);
                e[j] = t[s + j] * m[s + j];
                t[s + j] -= e[j];
                m[s + j] = e[j];
                for (int k = s + j + 1; k < width; ++k)
                    t[k] -= L[(ptrdiff_t)k * width + s + j] * e[j];
            }
        }
    }
}

/* Sweeps the tiles of columns 0..cols-1 that this thread owns (all of them outside a
 * parallel region) in work (2 * width vectors); a thread without work buffer (NULL) still
 * takes part in the loop, whose end is a barrier, and skips its tiles. */
static void sweep_tiles(float *wt, ptrdiff_t ldw, const float *mask, ptrdiff_t ldm, float *err, ptrdiff_t lde,
                        const float *L, const float *r2, int prunen, int prunem, int width, ptrdiff_t cols,
                        vf *work)
{
    vf *t = work, *m = work + width;
    const ptrdiff_t tiles = (cols + LANES - 1) / LANES;
#pragma omp for schedule(static)
    for (ptrdiff_t tile = 0; tile < tiles; ++tile) {
        if (work == NULL)
            continue;
        const ptrdiff_t x0 = tile * LANES;
        const size_t bytes = (size_t)(cols - x0 < LANES ? cols - x0 : LANES) * sizeof(float);
        if (bytes == sizeof(vf)) { /* constant sizes: vector moves, no library calls */
            for (int j = 0; j < width; ++j) {
                memcpy(&t[j], wt + j * ldw + x0, sizeof(vf));
                memcpy(&m[j], mask + j * ldm + x0, sizeof(vf));
            }
        } else { /* a last, partial tile: the unused lanes compute on zeros */
            memset(work, 0, 2 * (size_t)width * sizeof(vf));
            for (int j = 0; j < width; ++j) {
                memcpy(&t[j], wt + j * ldw + x0, bytes);
                memcpy(&m[j], mask + j * ldm + x0, bytes);
            }
        }
        if (prunem)
            sweep_tile(t, m, L, width, r2, prunen, prunem);
        else
            sweep_tile(t, m, L, width, NULL, 0, 0);
        if (bytes == sizeof(vf)) {
            for (int j = 0; j < width; ++j) {
                memcpy(wt + j * ldw + x0, &t[j], sizeof(vf));
                memcpy(err + j * lde + x0, &m[j], sizeof(vf));
            }
        } else {
            for (int j = 0; j < width; ++j) {
                memcpy(wt + j * ldw + x0, &t[j], bytes);
                memcpy(err + j * lde + x0, &m[j], bytes);
            }
        }
    }
}

/* wt, mask, err: (width, ld) row-major fp32, leading dimensions ldw, ldm, lde; L: (width,
 * width) row-major, N^T (only its strictly lower part is read). Columns 0..cols-1 of wt are swept
 * in place (pruned entries become exactly 0), err receives their errors (0 where kept). The
 * mask is read from `mask`, or, with prunem > 0 (dividing SUB and width), chosen prunen of
 * every prunem rows as the sweep reaches them (r2: (width,) r_j^2; `mask`'s values are unused).
 * Built with OpenMP, the tiles are shared out over its threads (the columns are independent:
 * the results do not depend on the thread count). Returns 0, or -1 when a work buffer could
 * not be allocated (some tiles are then left unswept). */
int prunekit_masked_block(float *wt, ptrdiff_t ldw, const float *mask, ptrdiff_t ldm, float *err, ptrdiff_t lde,
                          const float *L, const float *r2, int prunen, int prunem, int width, ptrdiff_t cols)
{
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        vf *work = aligned_alloc(sizeof(vf), 2 * (size_t)width * sizeof(vf));
        failed = work == NULL;
        sweep_tiles(wt, ldw, mask, ldm, err, lde, L, r2, prunen, prunem, width, cols, work);
        free(work);
    }
    return failed ? -1 : 0;
}

static inline uint32_t score_key(float w, float r2)
{
    const float s = (w * w) * r2;
    uint32_t key;
    memcpy(&key, &s, sizeof key);
    return key;
}

/* The k-th smallest (1-based) of x[0..n-1] by radix selection over 12 + 12 + 8 bits: each
 * level keeps only the keys of the bucket that holds rank k (in s1, then s2: n entries each);
 * *below and *equal receive how many keys are smaller than it and equal to it. */
static uint32_t radix_kth(const uint32_t *x, ptrdiff_t n, ptrdiff_t k, uint32_t *s1, uint32_t *s2, ptrdiff_t *below,
                          ptrdiff_t *equal)
{
    static const int shift[3] = {20, 8, 0};
    static const uint32_t buckets[3] = {4096, 4096, 256};
    uint32_t *kept_in[2] = {s1, s2};
    uint32_t prefix = 0;
    ptrdiff_t smaller = 0, count = 0;
    for (int level = 0; level < 3; ++level) {
        uint32_t hist[4][4096]; /* four partial histograms: fewer stalls on repeated buckets */
        memset(hist, 0, sizeof hist);
        const uint32_t mask = buckets[level] - 1;
        const int s = shift[level];
        ptrdiff_t i = 0;
        for (; i + 4 <= n; i += 4) {
            ++hist[0][(x[i] >> s) & mask];
            ++hist[1][(x[i + 1] >> s) & mask];
            ++hist[2][(x[i + 2] >> s) & mask];
            ++hist[3][(x[i + 3] >> s) & mask];
        }
        for (; i < n; ++i)
            ++hist[0][(x[i] >> s) & mask];
        uint32_t b = 0;
        for (;; ++b) {
            count = (ptrdiff_t)hist[0][b] + hist[1][b] + hist[2][b] + hist[3][b];
            if (smaller + count >= k)
                break;
            smaller += count;
        }
        prefix |= b << s;
        if (level < 2) {
            uint32_t *kept = kept_in[level];
            ptrdiff_t m = 0;
            for (i = 0; i < n; ++i) { /* branch free: the store is always made */
                kept[m] = x[i];
                m += ((x[i] >> s) & mask) == b;
            }
            x = kept;
            n = m;
        }
    }
    *below = smaller;
    *equal = count;
    return prefix;
}

/* mask[j][x] = 1 for the k smallest OBS scores s = (w * w) * r2[j] of w = wt[j][x] over the
 * block (width x cols), 0 for the others; 0 < k < the block's size. Among
 * scores equal to the k-th smallest, the lower flat positions (j, then x) win, so the mask is the
 * first k of a stable sort. The scores are non-negative floats, whose bit patterns order like
 * their values: selection runs on those integers. Returns 0, or -1 when memory runs out. */
int prunekit_smallest_scores(const float *wt, ptrdiff_t ldw, const float *r2, int width, ptrdiff_t cols, ptrdiff_t k,
                             float *mask, ptrdiff_t ldm)
{
    const ptrdiff_t n = (ptrdiff_t)width * cols;
    uint32_t *keys = malloc((size_t)n * sizeof *keys), *a = malloc((size_t)n * sizeof *a),
             *b = malloc((size_t)n * sizeof *b);
    if (keys == NULL || a == NULL || b == NULL) {
        free(keys);
        free(a);
        free(b);
        return -1;
    }
#pragma omp parallel for schedule(static)
    for (int j = 0; j < width; ++j) {
        const float *w = wt + j * ldw;
        const float rj = r2[j];
        uint32_t *kj = keys + j * cols;
        for (ptrdiff_t x = 0; x < cols; ++x)
            kj[x] = score_key(w[x], rj);
    }
    ptrdiff_t below, equal;
    const uint32_t t = radix_kth(keys, n, k, a, b, &below, &equal);
    ptrdiff_t take = k - below; /* of the keys equal to t, the first `take` in flat order */
    if (take == equal) {
#pragma omp parallel for schedule(static)
        for (int j = 0; j < width; ++j) {
            const uint32_t *kj = keys + j * cols;
            float *m = mask + j * ldm;
            for (ptrdiff_t x = 0; x < cols; ++x)
                m[x] = kj[x] <= t ? 1.0f : 0.0f;
        }
    } else {
        for (int j = 0; j < width; ++j) {
            const uint32_t *kj = keys + j * cols;
            float *m = mask + j * ldm;
            for (ptrdiff_t x = 0; x < cols; ++x) {
                const int tie = kj[x] == t && take > 0;
                take -= tie;
                m[x] = kj[x] < t || tie ? 1.0f : 0.0f;
            }
        }
    }
    free(keys);
    free(a);
    free(b);
    return 0;
}

/* dst (cols x rows, leading dimension ldd) = src (rows x cols, lds)^T, fp32, through 16 x 16
 * tiles that stay in L1, the tile rows shared out over OpenMP threads. */
void prunekit_transpose(const float *src, ptrdiff_t lds, float *dst, ptrdiff_t ldd, ptrdiff_t rows, ptrdiff_t cols)
{
    enum { TILE = 16 };
#pragma omp parallel for schedule(static)
    for (ptrdiff_t i0 = 0; i0 < rows; i0 += TILE) {
        for (ptrdiff_t j0 = 0; j0 < cols; j0 += TILE) {
            const ptrdiff_t i1 = i0 + TILE < rows ? i0 + TILE : rows, j1 = j0 + TILE < cols ? j0 + TILE : cols;
            if (i1 - i0 == TILE && j1 - j0 == TILE) { /* constant trip counts */
                float tile[TILE][TILE];
                for (int i = 0; i < TILE; ++i)
                    for (int j = 0; j < TILE; ++j)
                        tile[j][i] = src[(i0 + i) * lds + j0 + j];
                for (int j = 0; j < TILE; ++j)
                    for (int i = 0; i < TILE; ++i)
                        dst[(j0 + j) * ldd + i0 + i] = tile[j][i];
            } else {
                for (ptrdiff_t i = i0; i < i1; ++i)
                    for (ptrdiff_t j = j0; j < j1; ++j)
                        dst[j * ldd + i] = src[i * lds + j];
            }
        }
    }
}

/* |e|^2.4 for e >= 0 (0 for 0), vectorizable: 2^(2.4 log2 e) with log2 from the atanh series
 * on the mantissa in [sqrt(1/2), sqrt(2)) and 2^f from its Taylor series on [-1/2, 1/2]; the
 * exponent 2.4 e2 = (12 e2) / 5 is split into its integer quotient and a small remainder, so
 * that no large product rounds. Relative error about 1e-7 (GPTQ's mse norm). */
static inline float pow24(float e)
{
    union { float f; int32_t i; } u = { e };
    int32_t e2 = ((u.i >> 23) & 0xff) - 127;
    u.i = (u.i & 0x007fffff) | 0x3f800000; /* mantissa in [1, 2) */
    float m = u.f;
    int32_t big = m > 1.41421356f;
    m = big ? m * 0.5f : m;
    e2 += big;
    const float t = (m - 1.0f) / (m + 1.0f), t2 = t * t;
    const float l = 2.88539008f * t * (1.0f + t2 * (0.333333333f + t2 * (0.2f + t2 * (0.142857143f + t2 * 0.111111111f))));
    const int32_t twelve = 12 * e2, q = (twelve >= 0 ? twelve : twelve - 4) / 5; /* floor(12 e2 / 5) */
    const float y = (float)(twelve - 5 * q) * 0.2f + 2.4f * l;     /* in (-1.3, 2.4) */
    const float n = __builtin_rintf(y), f = (y - n) * 0.693147181f;
    const float p = 1.0f + f * (1.0f + f * (0.5f + f * (0.166666667f + f * (0.0416666667f + f * (0.00833333333f
                    + f * (0.00138888889f + f * 0.000198412698f))))));
    const int32_t exponent = q + (int32_t)n;
    union { int32_t i; float f; } s = { (exponent + 127) << 23 };
    return e == 0.0f || exponent < -126 ? 0.0f : p * s.f;
}

/* |q(x) - x|^2.4 on the grid (s, z): QuantSpec.quantize's operations in its order. */
static inline float grid_error(float x, float s, float z, float maxq)
{
    float k = __builtin_rintf(x / s) + z;
    k = k < 0.0f ? 0.0f : (k > maxq ? maxq : k);
    const float d = (k - z) * s - x;
    return pow24(d < 0.0f ? -d : d);
}

/* The mse search keeps MSE_LANES running sums (independent chains of |e|^2.4 polynomials;
 * 16 and 64 measured about as fast or slower). */
#define MSE_LANES 32

/* Sum of the MSE_LANES lane totals, pairwise. */
static inline float lane_total(const float *acc)
{
    float h[MSE_LANES / 2];
    for (int l = 0; l < MSE_LANES / 2; ++l)
        h[l] = acc[l] + acc[l + MSE_LANES / 2];
    for (int w = MSE_LANES / 4; w > 0; w /= 2)
        for (int l = 0; l < w; ++l)
            h[l] += h[l + w];
    return h[0];
}

/* GPTQ's mse grid search (quant.QuantSpec.grid): for each of `rows` rows of w (`cols` values,
 * row stride ldw) with range [xmin, xmax] (containing 0, not empty), the range factor
 * p = 1 - i/100, i < steps, whose grid (scale max(p(xmax - xmin)/maxq, tiny), zero
 * rint(-p xmin / scale), or `symzero` when symzero >= 0) gives the least sum |q(x) - x|^2.4,
 * ties to the larger p; q(x) = (clamp(rint(x/s) + z, 0, maxq) - z) s, in the operations and
 * order of QuantSpec.quantize. Zeros are left out (their error is exactly 0 on every grid).
 * scale, zero receive the chosen grids. Rows are shared out over OpenMP threads. */
int prunekit_mse_grid(const float *w, ptrdiff_t ldw, ptrdiff_t rows, ptrdiff_t cols, const float *xmin,
                      const float *xmax, float maxq, float symzero, int steps, float tiny, float *scale, float *zero)
{
    int failed = 0;
#pragma omp parallel
    {
        float *x = malloc((size_t)(cols > 0 ? cols : 1) * sizeof(float));
        if (!x) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (ptrdiff_t r = 0; r < rows; ++r) {
            if (!x)
                continue;
            ptrdiff_t n = 0;
            for (ptrdiff_t j = 0; j < cols; ++j) /* the row's nonzeros */
                if (w[r * ldw + j] != 0.0f)
                    x[n++] = w[r * ldw + j];
            float best = __builtin_inff(), best_s = 0.0f, best_z = 0.0f;
            for (int i = 0; i < steps; ++i) {
                const float p = (float)(1.0 - i / 100.0), lo = p * xmin[r], hi = p * xmax[r];
                float s = (hi - lo) / maxq;
                s = s < tiny ? tiny : s;
                const float z = symzero >= 0.0f ? symzero : __builtin_rintf(-lo / s);
                /* lane l sums the errors of x[j], j = l mod MSE_LANES; the lanes' total only grows, so a
                 * range is dropped as soon as its total reaches the best one: it cannot win */
                float acc[MSE_LANES] = {0}, err = 0.0f;
                for (ptrdiff_t j0 = 0; j0 < n && err < best; j0 += MSE_LANES) {
                    if (j0 + MSE_LANES <= n) {
                        for (int l = 0; l < MSE_LANES; ++l)
                            acc[l] += grid_error(x[j0 + l], s, z, maxq);
                    } else {
                        for (ptrdiff_t j = j0; j < n; ++j)
                            acc[j - j0] += grid_error(x[j], s, z, maxq);
                    }
                    err = lane_total(acc);
                }
                if (err < best) { /* ties: the larger range, found first */
                    best = err;
                    best_s = s;
                    best_z = z;
                }
            }
            scale[r] = best_s;
            zero[r] = best_z;
        }
        free(x);
    }
    return failed ? -1 : 0;
}
