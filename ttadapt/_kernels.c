/* Fused CPU kernels for the averaged gradient's elementwise hot spots (see kernels.py).
 *
 * Each kernel does in one pass over memory what the PyTorch fallback does in three to six: on
 * the CPU those passes are memory-bound, so the saving is mostly in bytes moved.
 * Results match the fallback's: bit for bit where the fallback is exact (clamp secants, the
 * AG-1 update, the tanh slope at ub == ua), to a few float32 ulps elsewhere (tanh(d)/d).
 *
 * Compiled by kernels.py with -ffp-contract=off (no silent fusing: every rounding below is the
 * one written, fmaf where one rounding is meant) and -fno-trapping-math (lets the compiler
 * vectorise the float-to-int conversion of the exponential; no IEEE flag is read anywhere).
 * NaN and infinity keep IEEE semantics.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define CHUNK 1024 /* elements per unit of work: four float32 arrays of it fit in L1 */
#define PARALLEL_MIN 16384 /* fewer elements run on one thread (a parallel region costs more) */
#define SMALL_CONTRACT_MAX 8 /* small_contract_f32's widest m */

/* e^x for finite x in [0, 18], vectorisable: Cephes' expf range reduction and polynomial. */
static inline float exp_0_18(float x) {
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = fmaf(1.9875691500E-4f, r, 1.3981999507E-3f);
    p = fmaf(p, r, 8.3334519073E-3f);
    p = fmaf(p, r, 4.1665795894E-2f);
    p = fmaf(p, r, 1.6666665459E-1f);
    p = fmaf(p, r, 5.0000001201E-1f);
    p = fmaf(p * r, r, r) + 1.0f;
    union { float f; int32_t i; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}

/* e^{2 min(a, 9)} for a >= 0: the exponential of tanh a = (e − 1)/(e + 1) (tanh is 1 in float32
 * beyond 9; the cap keeps e finite). */
static inline float exp_2a(float a) {
    return exp_0_18(2.0f * (a < 9.0f ? a : 9.0f));
}

/* e^x for x <= 0 (0 at -inf, NaN at NaN): exp_0_18's reduction, valid down to -87; below, the
 * result (under 1.7e-38) is returned as e^-87. */
static inline float exp_nonpositive(float x) {
    return exp_0_18(x > -87.0f ? x : -87.0f);
}

/* tanh(x)/x for x*x = z and |x| < 0.55: its Taylor series through x^16 (the first omitted
 * term is below 6e-9 there), by Horner's rule. Exactly 1 at z == 0. */
static inline float tanh_ratio_series(float z) {
    float p = fmaf(z, 0.000590027440f, -0.00145583438f);
    p = fmaf(z, p, 0.00359212803f);
    p = fmaf(z, p, -0.00886323552f);
    p = fmaf(z, p, 0.0218694885f);
    p = fmaf(z, p, -0.0539682540f);
    p = fmaf(z, p, 0.133333333f);
    p = fmaf(z, p, -0.333333333f);
    return fmaf(z, p, 1.0f);
}

/* tanh(x)/x for any x: the series below 0.55, (e − 1)/((e + 1)|x|) with e = e^{2 min(|x|, 9)}
 * above (tanh is 1 in float32 beyond 9; no cancellation since e > 3). 0 at ±inf, NaN at NaN. */
static inline float tanh_ratio(float x) {
    float a = fabsf(x);
    float e = exp_2a(a);
    float far = (e - 1.0f) / ((e + 1.0f) * a);
    return a < 0.55f ? tanh_ratio_series(x * x) : far;
}

static float max_gap(const float* ua, const float* ub, int64_t n) {
    float m = 0.0f; /* a NaN gap is skipped here and handled by the NaN rule */
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(ub[i] - ua[i]);
        m = a > m ? a : m;
    }
    return m;
}

/* tanh x, vectorisable, within a few ulps of libm's: x·tanh(x)/x by the series below 0.55,
 * ±(e − 1)/(e + 1) with e = e^{2 min(|x|, 9)} above (exactly ±1 beyond 9, ±inf included). NaN
 * stays NaN. */
static inline float tanh_f(float x) {
    float a = fabsf(x);
    float e = exp_2a(a);
    float far = copysignf((e - 1.0f) / (e + 1.0f), x);
    float near = x * tanh_ratio_series(x * x);
    return x != x ? x : (a < 0.55f ? near : far);
}

/* One element of the tanh secant: (1 − fa·fb)·t, t = tanh(d)/d (1 where d is NaN). */
static inline float tanh_slope(float fa, float fb, float t) {
    t = t != t ? 1.0f : t;
    return fmaf(-fa, fb, 1.0f) * t;
}

/* The tanh secant for |d| < 0.55 from fa = tanh(ua) alone (see tanh_secant_chunk). */
static inline float near_own_fb(float fa, float d) {
    float t = tanh_ratio_series(d * d);
    t = t != t ? 1.0f : t;
    return fmaf(-fa, fa, 1.0f) * t / fmaf(fa, d * t, 1.0f);
}

/* One chunk of the tanh secant; ``close``: every |d| < 0.55 (the usual case), series only.
 * fb NULL: tanh(ub) is formed here (fa where d == 0, so that a tie stays bit-exact); grad
 * non-NULL: out = grad ⊙ slope. */
static void tanh_secant_chunk(const float* ua, const float* fa, const float* ub, const float* fb, const float* grad,
                              float* out, int64_t n, int close) {
#define TANH_LOOP(T_OF_D)                                                                                              \
    do {                                                                                                               \
        if (fb && !grad) {                                                                                             \
            _Pragma("GCC ivdep") for (int64_t i = 0; i < n; i++) {                                                     \
                float d = ub[i] - ua[i];                                                                               \
                out[i] = tanh_slope(fa[i], fb[i], T_OF_D);                                                             \
            }                                                                                                          \
        } else if (fb) {                                                                                               \
            _Pragma("GCC ivdep") for (int64_t i = 0; i < n; i++) {                                                     \
                float d = ub[i] - ua[i];                                                                               \
                out[i] = grad[i] * tanh_slope(fa[i], fb[i], T_OF_D);                                                   \
            }                                                                                                          \
        } else if (!grad) {                                                                                            \
            _Pragma("GCC ivdep") for (int64_t i = 0; i < n; i++) {                                                     \
                float d = ub[i] - ua[i], f = fa[i];                                                                    \
                out[i] = OWN_FB(f, d);                                                                                 \
            }                                                                                                          \
        } else {                                                                                                       \
            _Pragma("GCC ivdep") for (int64_t i = 0; i < n; i++) {                                                     \
                float d = ub[i] - ua[i], f = fa[i];                                                                    \
                out[i] = grad[i] * OWN_FB(f, d);                                                                       \
            }                                                                                                          \
        }                                                                                                              \
    } while (0)
    if (close) {
        /* |d| < 0.55, so with T = tanh d, tanh ub = (fa + T)/(1 + fa·T) and the slope is
         * (1 − fa²)·(T/d)/(1 + fa·T), 1 + fa·T ≥ 0.49: no cancellation and no exponential. At
         * d == 0 it is 1 − fa² rounded once, the derivative bit for bit. */
#define OWN_FB(f, d) (d != d ? tanh_slope(f, tanh_f(ub[i]), d) : near_own_fb(f, d)) /* ±inf tied: 0 */
        TANH_LOOP(tanh_ratio_series(d * d));
#undef OWN_FB
    } else {
#define OWN_FB(f, d) tanh_slope(f, d == 0.0f ? f : tanh_f(ub[i]), tanh_ratio(d))
        TANH_LOOP(tanh_ratio(d));
#undef OWN_FB
    }
#undef TANH_LOOP
}

/* The tanh secant (tanh(ub) − tanh(ua))/(ub − ua) = (1 − fa·fb)·tanh(d)/d with fa = tanh(ua),
 * fb = tanh(ub), d = ub − ua. 1 − fa·fb is rounded once, as ATen's tanh_backward rounds 1 − y²,
 * so that at d == 0 the slope is the derivative bit for bit. Where d is NaN, tanh(d)/d is taken
 * as 1 (the fallback's nan_to_num). ``out`` may be ``fb`` or ``ub``; ``fb`` may be NULL (formed
 * here, see tanh_f); with ``grad``, out = grad ⊙ slope (and may be ``grad``). */
void tanh_secant_f32(const float* ua, const float* fa, const float* ub, const float* fb, const float* grad, float* out,
                     int64_t n, int threads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= PARALLEL_MIN)
    for (int64_t k = 0; k < chunks; k++) {
        int64_t o = k * CHUNK, m = n - o < CHUNK ? n - o : CHUNK;
        tanh_secant_chunk(ua + o, fa + o, ub + o, fb ? fb + o : NULL, grad ? grad + o : NULL, out + o, m,
                          max_gap(ua + o, ub + o, m) < 0.55f);
    }
}

/* The secant of the clamp f(u) = min(max(u, lo), hi) (ReLU: lo = 0, hi = inf; ReLU6; Hardtanh):
 * (f(ub) − f(ua))/(ub − ua), exact as the quotient is (slopes 0 and 1 only), and the derivative
 * [lo < ua < hi] where that is 0/0 (ub == ua, or a NaN or infinite input; an infinite bound
 * is no bound, as ReLU's derivative is 1 at +inf). With ``grad`` (not NULL) it writes
 * grad·slope instead: the averaged backward of the site in the same pass. ``out`` may be
 * ``ub`` or ``grad``. */
static inline float clamp_slope(float a, float b, float lo, float hi) {
    float va = a < lo ? lo : a; /* NaN stays NaN, as torch.clamp keeps it */
    va = va > hi ? hi : va;
    float vb = b < lo ? lo : b;
    vb = vb > hi ? hi : vb;
    float s = (vb - va) / (b - a);
    float derivative = ((a > lo) | (lo == -INFINITY)) & ((a < hi) | (hi == INFINITY)) ? 1.0f : 0.0f;
    return s != s ? derivative : s;
}

void clamp_secant_f32(const float* ua, const float* ub, const float* grad, float* out, int64_t n, float lo, float hi,
                      int threads) {
    int64_t chunks = (n + 4 * CHUNK - 1) / (4 * CHUNK);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= PARALLEL_MIN)
    for (int64_t k = 0; k < chunks; k++) {
        int64_t start = k * 4 * CHUNK, stop = start + 4 * CHUNK < n ? start + 4 * CHUNK : n;
        if (grad) {
#pragma GCC ivdep
            for (int64_t i = start; i < stop; i++)
                out[i] = grad[i] * clamp_slope(ua[i], ub[i], lo, hi);
        } else {
#pragma GCC ivdep
            for (int64_t i = start; i < stop; i++)
                out[i] = clamp_slope(ua[i], ub[i], lo, hi);
        }
    }
}

/* Σ|p − θ| over [start, stop), added up in double (a float sum of a few thousand like-sized terms
 * drifts by ~1e-6 of itself: its roundings do not average out); with g (not NULL) also
 * p ← θ − |p − θ|·sign(g), sign(0) = 0, and the sum made NaN by a non-finite g (g·0 is 0 for
 * finite g, NaN for ±inf and NaN). */
static double abs_diff_chunk(float* p, const float* theta, const float* g, int64_t start, int64_t stop) {
    double part = 0.0;
    if (g) {
#pragma omp simd reduction(+ : part)
        for (int64_t i = start; i < stop; i++) {
            float step = fabsf(p[i] - theta[i]);
            float sign = g[i] > 0.0f ? 1.0f : (g[i] < 0.0f ? -1.0f : 0.0f);
            part += step + g[i] * 0.0f;
            p[i] = theta[i] - step * sign;
        }
    } else {
#pragma omp simd reduction(+ : part)
        for (int64_t i = start; i < stop; i++)
            part += fabsf(p[i] - theta[i]);
    }
    return part;
}

/* abs_diff_chunk over all n elements, chunks summed in double. */
static double abs_diff_sum(float* p, const float* theta, const float* g, int64_t n, int threads) {
    double total = 0.0;
    int64_t chunks = (n + 4 * CHUNK - 1) / (4 * CHUNK);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= PARALLEL_MIN) reduction(+ : total)
    for (int64_t k = 0; k < chunks; k++) {
        int64_t start = k * 4 * CHUNK;
        total += abs_diff_chunk(p, theta, g, start, start + 4 * CHUNK < n ? start + 4 * CHUNK : n);
    }
    return total;
}

/* The AG-1 update of one tensor: with p holding the forecast θ′, p ← θ − |θ′ − θ|·sign(g)
 * (sign(0) = 0), and the return value Σ|θ′ − θ| — NaN where g is not finite. */
double ag1_update_f32(float* p, const float* theta, const float* g, int64_t n, int threads) {
    return abs_diff_sum(p, theta, g, n, threads);
}

/* ag1_update_f32 over `count` tensors in one call (a model's many small tensors: a call each
 * costs more than the arithmetic), the sums added up. */
double ag1_update_many_f32(int64_t count, float* const* p, const float* const* theta, const float* const* g,
                           const int64_t* n, int threads) {
    double total = 0.0;
    for (int64_t k = 0; k < count; k++)
        total += abs_diff_sum(p[k], theta[k], g[k], n[k], threads);
    return total;
}

/* 0 where every element of every tensor is finite, NaN where one is not (x·0 is 0 for a finite
 * x, NaN for ±inf and NaN; a sum of zeros cannot overflow): the non-finite guard's check of a
 * model's many small tensors in one read-only call. */
double finite_many_f32(int64_t count, const float* const* x, const int64_t* n, int threads) {
    (void)threads; /* small tensors: one thread */
    float flag = 0.0f;
    for (int64_t k = 0; k < count; k++) {
        const float* p = x[k];
        float part = 0.0f;
#pragma omp simd reduction(+ : part)
        for (int64_t i = 0; i < n[k]; i++)
            part += p[i] * 0.0f;
        flag += part;
    }
    return flag;
}

/* Σ|a − b|, read-only: AG-2's L1 step lengths. */
double l1_diff_f32(const float* a, const float* b, int64_t n, int threads) {
    return abs_diff_sum((float*)a, b, NULL, n, threads); /* without g nothing is written */
}

/* Σ_k Σ|a_k − b_k| over many tensors in one call (AG-2's L1 lengths on a model of many small
 * tensors), each tensor's sum as l1_diff_f32 forms it, the tensors' sums added in double in order. */
double l1_diff_many_f32(int64_t count, const float* const* a, const float* const* b, const int64_t* n, int threads) {
    double total = 0.0;
    for (int64_t k = 0; k < count; k++)
        total += abs_diff_sum((float*)a[k], b[k], NULL, n[k], threads);
    return total;
}

/* AG-2's committed step p ← θ + scale·(θ″ − θ), with p holding θ″ (differenced == 0) or θ″ − θ
 * (differenced != 0; then one rounding, as torch.add(θ, p, alpha=scale) in ATen's vector kernel). */
static void ag2_step(float* p, const float* theta, float scale, int64_t n, int differenced, int threads) {
    int64_t chunks = (n + 4 * CHUNK - 1) / (4 * CHUNK);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= PARALLEL_MIN)
    for (int64_t k = 0; k < chunks; k++) {
        int64_t start = k * 4 * CHUNK, stop = start + 4 * CHUNK < n ? start + 4 * CHUNK : n;
        if (differenced) {
#pragma GCC ivdep
            for (int64_t i = start; i < stop; i++)
                p[i] = fmaf(p[i], scale, theta[i]);
        } else {
#pragma GCC ivdep
            for (int64_t i = start; i < stop; i++)
                p[i] = theta[i] + scale * (p[i] - theta[i]);
        }
    }
}

/* AG-2's rescaled step, with p holding θ″: p ← θ + scale·(θ″ − θ). */
void ag2_rescale_f32(float* p, const float* theta, float scale, int64_t n, int threads) {
    ag2_step(p, theta, scale, n, 0, threads);
}

/* The secant of f(u) = s·(max(u, 0) + α·expm1(κ·min(u, 0))) (ELU, SELU, CELU; κ > 0) without
 * cancellation: with d = ub − ua, R = max(ub, 0) − max(ua, 0), H = d − R, m = min(·, 0),
 *     (f(ub) − f(ua))/d = s·(R + α·tanh(κH/2)·(e^{κ ma} + e^{κ mb}))/d,
 * the closed form of activations._exp_linear_secant. Where |κH/2| ≥ 0.55 the exponentials are
 * at least a factor e^{1.1} apart, so tanh(κH/2)·(e^{κ ma} + e^{κ mb}) = e^{κ mb} − e^{κ ma}
 * has no cancellation and is formed as that difference: two exponentials per element, not
 * three. Where that is 0/0 (ub == ua, or a NaN or infinite input): NaN, for the caller to put
 * ATen's derivative there bit for bit. With ``grad`` (not NULL) it writes grad·slope instead,
 * the site's averaged backward in the same pass, and takes the derivative at ua itself where
 * the slope is 0/0 (to an ulp of ATen's elu_backward: s·α·κ·e^{κ ua} where ua ≤ 0, s where
 * ua > 0, NaN where ua is NaN). ``out`` may be ``ub`` or ``grad``. */
static inline float exp_linear_slope(float a, float b, float alpha, float scale, float kappa, int fill, int close) {
    float pa = a < 0.0f ? 0.0f : a, pb = b < 0.0f ? 0.0f : b; /* NaN stays NaN */
    float ma = a > 0.0f ? 0.0f : a, mb = b > 0.0f ? 0.0f : b;
    float d = b - a;
    float r = pb - pa;
    float x = (kappa / 2.0f) * (d - r); /* κH/2 */
    float ea = exp_nonpositive(kappa * ma);
    float t = x * tanh_ratio_series(x * x); /* tanh(κH/2) where |κH/2| < 0.55 */
    float h; /* e^{κ mb} − e^{κ ma} */
    if (close) {
        /* every |κH/2| < 0.55 here: e^{κ mb} = e^{κ ma}·e^{κH} = ea·(1 + t)/(1 − t), so
         * tanh(κH/2)·(e^{κ ma} + e^{κ mb}) = 2·ea·t/(1 − t), 1 − t > 0.49: one exponential */
        h = (2.0f * ea) * t / (1.0f - t);
    } else {
        float eb = exp_nonpositive(kappa * mb);
        h = fabsf(x) < 0.55f ? t * (ea + eb) : eb - ea;
    }
    float q = scale * ((r + alpha * h) / d);
    float derivative = a > 0.0f ? scale : (a != a ? a : kappa * (alpha * scale) * ea);
    return fill && q != q ? derivative : q;
}

/* tanh, for the pass at the other state only (as exp_linear_f32): tanh_f elementwise. */
void tanh_f32(const float* x, float* out, int64_t n, int threads) {
    int64_t chunks = (n + 4 * CHUNK - 1) / (4 * CHUNK);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= PARALLEL_MIN)
    for (int64_t k = 0; k < chunks; k++) {
        int64_t start = k * 4 * CHUNK, stop = start + 4 * CHUNK < n ? start + 4 * CHUNK : n;
#pragma GCC ivdep
        for (int64_t i = start; i < stop; i++)
            out[i] = tanh_f(x[i]);
    }
}

/* expm1(y) for y <= 0 (−1 at −inf; NaN is the caller's), vectorisable: with y = n·ln 2 + r
 * (exp_0_18's reduction, |r| ≤ 0.35), e^y − 1 = 2^n·expm1(r) + (2^n − 1), expm1(r) by its
 * Taylor series through r^8 (the rest is below 3e-9 of it) and the sum rounded once (fmaf):
 * no cancellation where n = 0 (there it is expm1(r) itself), and little elsewhere. Within two
 * ulps of a correctly rounded expm1 on float32 y ≤ 0 (tests/test_kernels.py). */
static inline float expm1_nonpositive(float y) {
    y = y > -88.0f ? y : -88.0f; /* e^y − 1 rounds to −1 below −17 */
    float n = floorf(y * 1.44269504088896341f + 0.5f);
    float r = y - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = fmaf(r, 2.48015873e-5f, 1.98412698e-4f);
    p = fmaf(p, r, 1.38888889e-3f);
    p = fmaf(p, r, 8.33333333e-3f);
    p = fmaf(p, r, 4.16666667e-2f);
    p = fmaf(p, r, 1.66666667e-1f);
    p = fmaf(p, r, 0.5f);
    float q = fmaf(p * r, r, r);
    union { float f; int32_t i; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    float e = fmaf(scale.f, q, scale.f - 1.0f);
    return y == 0.0f ? y : e; /* expm1(−0) = −0 (the reduction would give +0) */
}

/* The ELU family's forward, for the pass at the other state only (its outputs feed nothing but
 * that state's pre-activations): scale·x where x ≥ 0, else neg·expm1(κx), neg = α·scale — as
 * ATen's elu kernel forms it, with expm1_nonpositive for its expm1 (ATen: Sleef's or libm's;
 * the two agree to a few ulps). NaN stays NaN. Several times faster than ATen's on AVX2. */
void exp_linear_f32(const float* x, float* out, int64_t n, float neg, float scale, float kappa, int threads) {
    int64_t chunks = (n + 4 * CHUNK - 1) / (4 * CHUNK);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= PARALLEL_MIN)
    for (int64_t k = 0; k < chunks; k++) {
        int64_t start = k * 4 * CHUNK, stop = start + 4 * CHUNK < n ? start + 4 * CHUNK : n;
#pragma GCC ivdep
        for (int64_t i = start; i < stop; i++) {
            float a = x[i];
            float y = a < 0.0f ? a * kappa : 0.0f;
            float e = expm1_nonpositive(y) * neg;
            out[i] = a >= 0.0f ? a * scale : (a != a ? a : e);
        }
    }
}

/* Returns, without ``grad``, how many slopes came out NaN (0/0: ties and NaN inputs), and puts
 * the positions of up to ``max_ties`` of them into ``ties`` (in no particular order), so that
 * the caller replaces a few without scanning the whole tensor again. */
int64_t exp_linear_secant_f32(const float* ua, const float* ub, const float* grad, float* out, int64_t n, float alpha,
                              float scale, float kappa, int threads, int64_t* ties, int64_t max_ties) {
    int64_t chunks = (n + 4 * CHUNK - 1) / (4 * CHUNK);
    int64_t count = 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= PARALLEL_MIN)
    for (int64_t k = 0; k < chunks; k++) {
        int64_t start = k * 4 * CHUNK, stop = start + 4 * CHUNK < n ? start + 4 * CHUNK : n;
        /* the usual case (close inputs: every |κH/2| ≤ |κd/2| < 0.55) takes one exponential */
        int close = max_gap(ua + start, ub + start, stop - start) * (kappa / 2.0f) < 0.55f;
        if (grad && close) {
#pragma GCC ivdep
            for (int64_t i = start; i < stop; i++)
                out[i] = grad[i] * exp_linear_slope(ua[i], ub[i], alpha, scale, kappa, 1, 1);
        } else if (grad) {
#pragma GCC ivdep
            for (int64_t i = start; i < stop; i++)
                out[i] = grad[i] * exp_linear_slope(ua[i], ub[i], alpha, scale, kappa, 1, 0);
        } else {
            int any = 0;
            if (close) {
#pragma GCC ivdep
                for (int64_t i = start; i < stop; i++) {
                    float q = exp_linear_slope(ua[i], ub[i], alpha, scale, kappa, 0, 1);
                    out[i] = q;
                    any |= q != q;
                }
            } else {
#pragma GCC ivdep
                for (int64_t i = start; i < stop; i++) {
                    float q = exp_linear_slope(ua[i], ub[i], alpha, scale, kappa, 0, 0);
                    out[i] = q;
                    any |= q != q;
                }
            }
            if (any) {
                for (int64_t i = start; i < stop; i++) {
                    if (out[i] != out[i]) {
                        int64_t slot;
#pragma omp atomic capture
                        slot = count++;
                        if (slot < max_ties)
                            ties[slot] = i;
                    }
                }
            }
        }
    }
    return count;
}

/* σ(−u) for any u: e/(1 + e) for u ≥ 0, else 1/(1 + e), with e = e^{−|u|} — no cancellation
 * (1 − σ(u) loses all precision once σ(u) rounds to 1). NaN inputs are the caller's. */
static inline float sigmoid_neg(float u) {
    float e = exp_nonpositive(-fabsf(u));
    return u >= 0.0f ? e / (1.0f + e) : 1.0f / (1.0f + e);
}

/* The Sigmoid secant σ(b) − σ(a) = (σ(a)·σ(−b) + σ(b)·σ(−a))·tanh(d/2) over d = b − a, from
 * fa = σ(ua) and fb = σ(ub) (ATen's): every term positive, no cancellation. Where d == 0 or the
 * slope is NaN (a NaN input, or infinities that tie), ATen's derivative (1 − fa)·fa, as the
 * PyTorch form's fill of its 0/0s gives. ``out`` may be ``fb`` or ``ub``. */
void sigmoid_secant_f32(const float* ua, const float* fa, const float* ub, const float* fb, float* out, int64_t n,
                        int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= PARALLEL_MIN)
    for (int64_t start = 0; start < n; start += 4 * CHUNK) {
        int64_t stop = start + 4 * CHUNK < n ? start + 4 * CHUNK : n;
#pragma GCC ivdep
        for (int64_t i = start; i < stop; i++) {
            float a = ua[i], b = ub[i], sa = fa[i];
            float d = b - a;
            float x = sa * sigmoid_neg(b) + fb[i] * sigmoid_neg(a);
            float q = x * (0.5f * tanh_ratio(0.5f * d));
            out[i] = (d == 0.0f || q != q) ? (1.0f - sa) * sa : q;
        }
    }
}

/* The paper's division-by-zero rule: the inputs are too close for a secant where
 * |ub − ua| − tol·|ua| ≤ tol, with the fused multiply-add of ATen's vectorised sub-with-alpha
 * (the PyTorch fallback's test). */
static inline int too_close(float a, float b, float tol) {
    return fmaf(fabsf(a), -tol, fabsf(b - a)) <= tol;
}

/* The generic secant slope (fb − fa) / (ub − ua) of an activation without a closed form, from
 * its outputs at both inputs, in one pass, rounded as PyTorch rounds it (two differences, one
 * division). Returns how many elements are too close for it (too_close), and puts the
 * positions of up to ``max_close`` of them into ``close`` (in no particular order) for the
 * caller to replace by the derivative; with more, close_fill_f32 does. A chunk holding more
 * than its share of max_close (by its length) is not scanned for positions (the total is then
 * likely past max_close, and the scan would be wasted); if the total still comes to at most
 * max_close, max_close + 1 is returned instead, so that close_fill_f32 runs. ``out`` may be
 * ``fb`` (each element is read before it is written), not ``ua`` or ``ub``. */
int64_t quotient_secant_f32(const float* ua, const float* fa, const float* ub, const float* fb, float* out, int64_t n,
                            float tol, int threads, int64_t* close, int64_t max_close) {
    int64_t chunks = (n + 4 * CHUNK - 1) / (4 * CHUNK);
    int64_t count = 0, recorded = 0, unscanned = 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= PARALLEL_MIN) reduction(+ : count, unscanned)
    for (int64_t k = 0; k < chunks; k++) {
        int64_t start = k * 4 * CHUNK, stop = start + 4 * CHUNK < n ? start + 4 * CHUNK : n;
        int64_t here = 0, len = stop - start;
        uint64_t words[4 * CHUNK / 8]; /* the test per element, a byte each, read 8 at a time below */
        unsigned char* near = (unsigned char*)words;
#pragma GCC ivdep
        for (int64_t i = start; i < stop; i++) {
            int t = too_close(ua[i], ub[i], tol);
            out[i] = (fb[i] - fa[i]) / (ub[i] - ua[i]);
            near[i - start] = (unsigned char)t;
            here += t;
        }
        if (here && (double)here * (double)n > (double)max_close * (double)len) {
            unscanned += here; /* (dense: see above) */
        } else if (here) { /* (within its share: the chunks scanned hold at most max_close in all) */
            int64_t slot;
#pragma omp atomic capture
            {
                slot = recorded;
                recorded += here;
            }
            for (int64_t j = len; j % 8; j++)
                near[j] = 0;
            for (int64_t w = 0; w < (len + 7) / 8; w++) {
                if (!words[w]) /* (the usual case: eight elements apart) */
                    continue;
                for (int64_t j = 8 * w; j < 8 * w + 8; j++) {
                    if (near[j])
                        close[slot++] = start + j;
                }
            }
        }
        count += here;
    }
    return unscanned && count <= max_close ? max_close + 1 : count;
}

/* out ← deriv where ua and ub are too close for a secant (after quotient_secant_f32 found
 * many such elements). */
void close_fill_f32(const float* ua, const float* ub, const float* deriv, float* out, int64_t n, float tol,
                    int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= PARALLEL_MIN)
    for (int64_t start = 0; start < n; start += 4 * CHUNK) {
        int64_t stop = start + 4 * CHUNK < n ? start + 4 * CHUNK : n;
#pragma GCC ivdep
        for (int64_t i = start; i < stop; i++)
            out[i] = too_close(ua[i], ub[i], tol) ? deriv[i] : out[i];
    }
}

/* AG-2's dry step of torch.optim.Adam / AdamW, computed from the state before the forecast,
 * which is only read: with d holding the forecast θ′ on entry, sums[0] += Σ|θ′ − θ|, then
 * d ← θ″ − θ and sums[1] += Σ|θ″ − θ|, θ″ being what Adam's single-tensor step computes from
 * θ, operation by operation, with the roundings of ATen's vectorised CPU kernels (fmaf where
 * they fuse: lerp, addcmul, add with alpha). The square root here is correctly rounded;
 * ATen's float sqrt is not always (within an ulp), so a few θ″ differ from torch's by an ulp.
 * h: 1 − β1, β2, 1 − β2, −lr/(1 − β1^t), (1 − β2^t)^½, eps, ±1 (−1: maximize), the coupled
 * weight decay (Adam; else 0), 1 − lr·weight decay (AdamW; else 1). vmax (amsgrad's running
 * maximum) may be NULL. Each variant's loop is branch-free so that it vectorises. */
#define ADAM_CHUNK(NAME, VMAX)                                                                                        \
    static void NAME(const float* theta, const float* grad, const float* m, const float* v, const float* vmax,        \
                     float* d, int64_t start, int64_t stop, const float* h, double* fore, double* dry) {              \
        const float w1 = h[0], b2 = h[1], w2 = h[2], neg_step = h[3], bc2 = h[4], eps = h[5], sign = h[6];            \
        const float wd = h[7], decay = h[8];                                                                          \
        const float c = w1 < 0.5f ? w1 : w1 - 1.0f; /* torch.lerp as ATen's vector kernel: */                         \
        const int small = w1 < 0.5f; /* fmaf(w, g − m, m) for w < 0.5, else fmaf(w − 1, g − m, g) */                  \
        double f = 0.0, s = 0.0; /* (in double: see abs_diff_chunk) */                                               \
        _Pragma("omp simd reduction(+ : f, s)") for (int64_t i = start; i < stop; i++) {                              \
            float t = theta[i], mi = m[i];                                                                            \
            float g = fmaf(t, wd, sign * grad[i]);                                                                    \
            float m1 = fmaf(c, g - mi, small ? mi : g);                                                               \
            float v1 = fmaf(w2 * g, g, v[i] * b2);                                                                    \
            if (VMAX)                                                                                                 \
                v1 = vmax[i] != vmax[i] || vmax[i] > v1 ? vmax[i] : v1; /* torch.maximum: a NaN wins */               \
            float denom = sqrtf(v1) / bc2 + eps;                                                                      \
            float step = (t * decay + (neg_step * m1) / denom) - t;                                                   \
            f += fabsf(d[i] - t);                                                                                     \
            s += fabsf(step);                                                                                         \
            d[i] = step;                                                                                              \
        }                                                                                                             \
        *fore += f;                                                                                                   \
        *dry += s;                                                                                                    \
    }
ADAM_CHUNK(adam_chunk, 0)
ADAM_CHUNK(amsgrad_chunk, 1)

/* The same for torch.optim.RMSprop. h: α, 1 − α, −lr, eps, ±1 (−1: maximize), weight decay,
 * momentum. grad_avg (centered) and buf (momentum > 0) may be NULL. */
#define RMSPROP_CHUNK(NAME, CENTERED, MOMENTUM)                                                                       \
    static void NAME(const float* theta, const float* grad, const float* sq, const float* grad_avg, const float* buf, \
                     float* d, int64_t start, int64_t stop, const float* h, double* fore, double* dry) {              \
        const float alpha = h[0], w = h[1], neg_lr = h[2], eps = h[3], sign = h[4], wd = h[5], momentum = h[6];       \
        const float c = w < 0.5f ? w : w - 1.0f;                                                                      \
        const int small = w < 0.5f;                                                                                   \
        double f = 0.0, s = 0.0; /* (in double: see abs_diff_chunk) */                                               \
        _Pragma("omp simd reduction(+ : f, s)") for (int64_t i = start; i < stop; i++) {                              \
            float t = theta[i];                                                                                       \
            float g = fmaf(t, wd, sign * grad[i]);                                                                    \
            float s1 = fmaf(w * g, g, sq[i] * alpha);                                                                 \
            float avg;                                                                                                \
            if (CENTERED) {                                                                                           \
                float a = grad_avg[i];                                                                                \
                float a1 = fmaf(c, g - a, small ? a : g); /* lerp */                                                  \
                avg = sqrtf(fmaf(-a1, a1, s1)) + eps;                                                                 \
            } else {                                                                                                  \
                avg = sqrtf(s1) + eps;                                                                                \
            }                                                                                                         \
            float step = (MOMENTUM ? fmaf(buf[i] * momentum + g / avg, neg_lr, t) : t + (neg_lr * g) / avg) - t;      \
            f += fabsf(d[i] - t);                                                                                     \
            s += fabsf(step);                                                                                         \
            d[i] = step;                                                                                              \
        }                                                                                                             \
        *fore += f;                                                                                                   \
        *dry += s;                                                                                                    \
    }
RMSPROP_CHUNK(rmsprop_chunk, 0, 0)
RMSPROP_CHUNK(rmsprop_centered_chunk, 1, 0)
RMSPROP_CHUNK(rmsprop_momentum_chunk, 0, 1)
RMSPROP_CHUNK(rmsprop_centered_momentum_chunk, 1, 1)

typedef void (*direction_chunk)(const float*, const float*, const float*, const float*, const float*, float*, int64_t,
                                int64_t, const float*, double*, double*);

static void direction(direction_chunk chunk, const float* theta, const float* grad, const float* a, const float* b,
                      const float* c, float* d, int64_t n, const float* h, double* sums, int threads) {
    double fore = 0.0, dry = 0.0;
    int64_t chunks = (n + 4 * CHUNK - 1) / (4 * CHUNK);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= PARALLEL_MIN) reduction(+ : fore, dry)
    for (int64_t k = 0; k < chunks; k++) {
        int64_t start = k * 4 * CHUNK;
        chunk(theta, grad, a, b, c, d, start, start + 4 * CHUNK < n ? start + 4 * CHUNK : n, h, &fore, &dry);
    }
    sums[0] += fore;
    sums[1] += dry;
}

/* AG-2's dry step of Adam / AdamW over `count` tensors in one call (ADAM_CHUNK; h: 9 per tensor),
 * sums added up. */
void adam_direction_many_f32(int64_t count, const float* const* theta, const float* const* grad, const float* const* m,
                             const float* const* v, const float* const* vmax, float* const* d, const int64_t* n,
                             const float* h, double* sums, int threads) {
    for (int64_t k = 0; k < count; k++)
        direction(vmax[k] ? amsgrad_chunk : adam_chunk, theta[k], grad[k], m[k], v[k], vmax[k], d[k], n[k], h + 9 * k,
                  sums, threads);
}

/* The same for RMSprop (RMSPROP_CHUNK; h: 7 per tensor). */
void rmsprop_direction_many_f32(int64_t count, const float* const* theta, const float* const* grad,
                                const float* const* sq, const float* const* grad_avg, const float* const* buf,
                                float* const* d, const int64_t* n, const float* h, double* sums, int threads) {
    for (int64_t k = 0; k < count; k++)
        direction(grad_avg[k] ? (buf[k] ? rmsprop_centered_momentum_chunk : rmsprop_centered_chunk)
                              : (buf[k] ? rmsprop_momentum_chunk : rmsprop_chunk),
                  theta[k], grad[k], sq[k], grad_avg[k], buf[k], d[k], n[k], h + 7 * k, sums, threads);
}

/* AG-2's committed step over `count` tensors, with p holding θ″ − θ (see ag2_step). */
void ag2_commit_many_f32(int64_t count, float* const* p, const float* const* theta, const int64_t* n, float scale,
                         int threads) {
    for (int64_t k = 0; k < count; k++)
        ag2_step(p[k], theta[k], scale, n[k], 1, threads);
}

/* ag2_rescale_f32 over many tensors in one call: p_k ← θ_k + scale·(θ″_k − θ_k), p_k holding θ″_k. */
void ag2_rescale_many_f32(int64_t count, float* const* p, const float* const* theta, const int64_t* n, float scale,
                          int threads) {
    for (int64_t k = 0; k < count; k++)
        ag2_step(p[k], theta[k], scale, n[k], 0, threads);
}

/* AG-1/AG-2's forecast step θ′ = OPT(s, θ, g) of torch.optim.Adam / AdamW, out of place on the
 * state: with p holding θ, p ← θ′; the moments after the step go to mo, vo (and vmo, amsgrad's
 * running maximum), the ones before (m, v, vmax) are only read — they stay the state to fall
 * back on. The arithmetic is ADAM_CHUNK's, operation for operation (the same roundings as the
 * single-tensor step, up to ATen's float sqrt); h as there, for the step being taken. */
#define ADAM_FORECAST_CHUNK(NAME, VMAX)                                                                               \
    static void NAME(float* p, const float* grad, const float* m, const float* v, const float* vmax, float* mo,      \
                     float* vo, float* vmo, int64_t start, int64_t stop, const float* h) {                            \
        const float w1 = h[0], b2 = h[1], w2 = h[2], neg_step = h[3], bc2 = h[4], eps = h[5], sign = h[6];            \
        const float wd = h[7], decay = h[8];                                                                          \
        const float c = w1 < 0.5f ? w1 : w1 - 1.0f;                                                                   \
        const int small = w1 < 0.5f;                                                                                  \
        _Pragma("omp simd") for (int64_t i = start; i < stop; i++) {                                                  \
            float t = p[i], mi = m[i];                                                                                \
            float g = fmaf(t, wd, sign * grad[i]);                                                                    \
            float m1 = fmaf(c, g - mi, small ? mi : g);                                                               \
            float v1 = fmaf(w2 * g, g, v[i] * b2);                                                                    \
            vo[i] = v1;                                                                                               \
            if (VMAX) {                                                                                               \
                v1 = vmax[i] != vmax[i] || vmax[i] > v1 ? vmax[i] : v1;                                               \
                vmo[i] = v1;                                                                                          \
            }                                                                                                         \
            float denom = sqrtf(v1) / bc2 + eps;                                                                      \
            mo[i] = m1;                                                                                               \
            p[i] = t * decay + (neg_step * m1) / denom;                                                               \
        }                                                                                                             \
    }
ADAM_FORECAST_CHUNK(adam_forecast_chunk, 0)
ADAM_FORECAST_CHUNK(amsgrad_forecast_chunk, 1)

/* The same for torch.optim.RMSprop (RMSPROP_CHUNK's arithmetic): square_avg → so, grad_avg → ao
 * (centered), momentum_buffer → bo (momentum > 0). */
#define RMSPROP_FORECAST_CHUNK(NAME, CENTERED, MOMENTUM)                                                              \
    static void NAME(float* p, const float* grad, const float* sq, const float* grad_avg, const float* buf, float* so, \
                     float* ao, float* bo, int64_t start, int64_t stop, const float* h) {                             \
        const float alpha = h[0], w = h[1], neg_lr = h[2], eps = h[3], sign = h[4], wd = h[5], momentum = h[6];       \
        const float c = w < 0.5f ? w : w - 1.0f;                                                                      \
        const int small = w < 0.5f;                                                                                   \
        _Pragma("omp simd") for (int64_t i = start; i < stop; i++) {                                                  \
            float t = p[i];                                                                                           \
            float g = fmaf(t, wd, sign * grad[i]);                                                                    \
            float s1 = fmaf(w * g, g, sq[i] * alpha);                                                                 \
            so[i] = s1;                                                                                               \
            float avg;                                                                                                \
            if (CENTERED) {                                                                                           \
                float a = grad_avg[i];                                                                                \
                float a1 = fmaf(c, g - a, small ? a : g);                                                             \
                ao[i] = a1;                                                                                           \
                avg = sqrtf(fmaf(-a1, a1, s1)) + eps;                                                                 \
            } else {                                                                                                  \
                avg = sqrtf(s1) + eps;                                                                                \
            }                                                                                                         \
            if (MOMENTUM) {                                                                                           \
                float b1 = buf[i] * momentum + g / avg;                                                               \
                bo[i] = b1;                                                                                           \
                p[i] = fmaf(b1, neg_lr, t);                                                                           \
            } else {                                                                                                  \
                p[i] = t + (neg_lr * g) / avg;                                                                        \
            }                                                                                                         \
        }                                                                                                             \
    }
RMSPROP_FORECAST_CHUNK(rmsprop_forecast_chunk, 0, 0)
RMSPROP_FORECAST_CHUNK(rmsprop_centered_forecast_chunk, 1, 0)
RMSPROP_FORECAST_CHUNK(rmsprop_momentum_forecast_chunk, 0, 1)
RMSPROP_FORECAST_CHUNK(rmsprop_centered_momentum_forecast_chunk, 1, 1)

typedef void (*forecast_chunk)(float*, const float*, const float*, const float*, const float*, float*, float*, float*,
                               int64_t, int64_t, const float*);

/* One forecast step over `count` tensors in one call (an optimizer's state is many small
 * tensors: a call each would cost more than the arithmetic on most of them). Tensor k has n[k]
 * elements, hyper-parameters h + k·hn, and the inputs a/b/c and outputs ao/bo/co named per
 * kernel above (NULL entries where a variant has no such state), and its float32 step count
 * at steps[k] (advanced by one; NULL: left alone). Large tensors are split over the threads;
 * small ones run whole. */
static void forecast(int64_t count, float* const* p, const float* const* grad, const float* const* a,
                     const float* const* b, const float* const* c, float* const* ao, float* const* bo, float* const* co,
                     float* const* steps, const int64_t* n, const float* h, int64_t hn,
                     forecast_chunk (*pick)(const float*, const float*, const float*), int threads) {
    for (int64_t k = 0; k < count; k++) {
        if (steps && steps[k])
            *steps[k] += 1.0f; /* the step count, as the real step's step_t += 1 */
        forecast_chunk chunk = pick(a[k], b ? b[k] : NULL, c ? c[k] : NULL);
        int64_t size = n[k];
        const float* hk = h + k * hn;
        int64_t chunks = (size + 4 * CHUNK - 1) / (4 * CHUNK);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && size >= PARALLEL_MIN)
        for (int64_t j = 0; j < chunks; j++) {
            int64_t start = j * 4 * CHUNK;
            chunk(p[k], grad[k], a[k], b ? b[k] : NULL, c ? c[k] : NULL, ao[k], bo ? bo[k] : NULL, co ? co[k] : NULL, start,
                  start + 4 * CHUNK < size ? start + 4 * CHUNK : size, hk);
        }
    }
}

static forecast_chunk pick_adam(const float* m, const float* v, const float* vmax) {
    (void)m;
    (void)v;
    return vmax ? amsgrad_forecast_chunk : adam_forecast_chunk;
}

static forecast_chunk pick_rmsprop(const float* sq, const float* grad_avg, const float* buf) {
    (void)sq;
    return grad_avg ? (buf ? rmsprop_centered_momentum_forecast_chunk : rmsprop_centered_forecast_chunk)
                    : (buf ? rmsprop_momentum_forecast_chunk : rmsprop_forecast_chunk);
}

/* m, v, vmax → mo, vo, vmo (vmax and vmo entries NULL without amsgrad); h: 9 per tensor. */
void adam_forecast_f32(int64_t count, float* const* p, const float* const* grad, const float* const* m,
                       const float* const* v, const float* const* vmax, float* const* mo, float* const* vo,
                       float* const* vmo, float* const* steps, const int64_t* n, const float* h, int threads) {
    forecast(count, p, grad, m, v, vmax, mo, vo, vmo, steps, n, h, 9, pick_adam, threads);
}

/* square_avg, grad_avg, momentum_buffer → so, ao, bo (NULL entries where absent); h: 7 per tensor. */
void rmsprop_forecast_f32(int64_t count, float* const* p, const float* const* grad, const float* const* sq,
                          const float* const* grad_avg, const float* const* buf, float* const* so, float* const* ao,
                          float* const* bo, float* const* steps, const int64_t* n, const float* h, int threads) {
    forecast(count, p, grad, sq, grad_avg, buf, so, ao, bo, steps, n, h, 7, pick_rmsprop, threads);
}

/* out = max(out, v), NaN taken over any number — the rule of ATen's CPU max pooling
 * ((v > m) || isnan(v)), so that with the window visited in ATen's order (rows, then columns)
 * the result is its bit for bit (a tie between −0.0 and +0.0 included). */
static inline float max_nan(float m, float v) {
    return (v > m || v != v) ? v : m;
}

/* 2-D max pooling with 2 × 2 windows and stride 2 (no padding, no dilation, ceil_mode=False) of
 * `planes` contiguous h × w planes into oh × ow ones: ATen's values for NCHW float32 input, with
 * each window visited in its order, in a fifth to a quarter of its kernel's time. With `idx` (not
 * NULL) also ATen's indices: the position r·w + c in its plane of the element taken — the first
 * maximum in window order, the last NaN (the element that set the value under ATen's rule) — for
 * ATen's own backward. (Other windows: max_pool2d_f32.) */
void max_pool2x2_f32(const float* x, float* out, int64_t* idx, int64_t planes, int64_t h, int64_t w, int64_t oh,
                     int64_t ow, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && planes * oh * ow >= PARALLEL_MIN)
    for (int64_t q = 0; q < planes; q++) {
        const float* xp = x + q * h * w;
        float* op = out + q * oh * ow;
        if (idx) {
            int64_t* ip = idx + q * oh * ow;
            for (int64_t i = 0; i < oh; i++) {
                const float* r0 = xp + 2 * i * w;
                const float* r1 = r0 + w;
                int64_t base = 2 * i * w;
                for (int64_t j = 0; j < ow; j++) {
                    float m = r0[2 * j], v;
                    int64_t at = base + 2 * j;
                    v = r0[2 * j + 1];
                    if (v > m || v != v) { m = v; at = base + 2 * j + 1; }
                    v = r1[2 * j];
                    if (v > m || v != v) { m = v; at = base + w + 2 * j; }
                    v = r1[2 * j + 1];
                    if (v > m || v != v) { m = v; at = base + w + 2 * j + 1; }
                    op[i * ow + j] = m;
                    ip[i * ow + j] = at;
                }
            }
            continue;
        }
        for (int64_t i = 0; i < oh; i++) {
            const float* r0 = xp + 2 * i * w;
            const float* r1 = r0 + w;
            float* orow = op + i * ow;
            for (int64_t j = 0; j < ow; j++) {
                float m = r0[2 * j]; /* max_nan(−inf, v) is v */
                m = max_nan(m, r0[2 * j + 1]);
                m = max_nan(m, r1[2 * j]);
                orow[j] = max_nan(m, r1[2 * j + 1]);
            }
        }
    }
}

static inline int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }
static inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

/* Whether each of n windows along a dimension of the given size (start i·stride − pad, k taps
 * dilation apart) has a tap inside it. */
static int window_taps_input(int64_t n, int64_t size, int64_t k, int64_t stride, int64_t pad, int64_t dilation) {
    for (int64_t i = 0; i < n; i++) {
        int64_t start = i * stride - pad;
        int64_t a = start < 0 ? ceil_div(-start, dilation) : 0;
        if (a >= k || start + a * dilation >= size)
            return 0;
    }
    return 1;
}

/* Row maxima for max_pool2d_f32: hm[J] (and hi[J], the position taken) for J in [J0, J1), the
 * fold of x[J·sw + off + b·dw], b = 0 … kw − 1, in that order under ATen's rule (all in bounds).
 * Inlined with constant kw / sw / dw for the common windows, so that it vectorises over J. */
static inline __attribute__((always_inline)) void pool_row_fold(const float* x, float* hm, int64_t* hi, int64_t J0,
        int64_t J1, int64_t kw, int64_t sw, int64_t dw, int64_t off) {
    if (hi) {
#pragma omp simd
        for (int64_t J = J0; J < J1; J++) {
            int64_t c = J * sw + off;
            float m = x[c];
            int64_t at = c;
            for (int64_t b = 1; b < kw; b++) {
                float v = x[c + b * dw];
                int take = (v > m) | (v != v);
                m = take ? v : m;
                at = take ? c + b * dw : at;
            }
            hm[J] = m;
            hi[J] = at;
        }
    } else {
#pragma omp simd
        for (int64_t J = J0; J < J1; J++) {
            int64_t c = J * sw + off;
            float m = x[c];
            for (int64_t b = 1; b < kw; b++)
                m = max_nan(m, x[c + b * dw]);
            hm[J] = m;
        }
    }
}

/* One output column j of a row whose window reaches past the row's ends: its taps in the row. */
static void pool_row_edge(const float* row, int64_t rbase, float* hm, int64_t* hi, int64_t j, int64_t w, int64_t kw,
                          int64_t sw, int64_t dw, int64_t off) {
    float m = -INFINITY;
    int64_t at = -1;
    for (int64_t b = 0; b < kw; b++) {
        int64_t c = j * sw + off + b * dw;
        if (c < 0 || c >= w)
            continue;
        float v = row[c];
        if (at < 0 || v > m || v != v) {
            m = v;
            at = rbase + c;
        }
    }
    hm[j] = m;
    if (hi)
        hi[j] = at;
}

/* The row maxima of one h × w plane into hm / hi (h × ow). Where w = ow·sw the plane is one
 * signal (output column j of row r is J = r·ow + j, its taps at J·sw + off + b·dw), so that one
 * loop runs over all rows at once — resnet's stem pool has rows of 16 outputs, too short for a
 * vector loop each; the columns whose windows cross a row's end are then redone. */
static inline __attribute__((always_inline)) void pool_rows(const float* xp, float* hm, int64_t* hi, int64_t h,
        int64_t w, int64_t ow, int64_t kw, int64_t sw, int64_t dw, int64_t pw, int64_t j0, int64_t j1) {
    int64_t off = -pw;
    if (w == ow * sw && j0 < j1) {
        pool_row_fold(xp, hm, hi, j0, (h - 1) * ow + j1, kw, sw, dw, off);
        for (int64_t r = 0; r < h; r++) {
            for (int64_t j = 0; j < j0; j++)
                pool_row_edge(xp + r * w, r * w, hm + r * ow, hi ? hi + r * ow : NULL, j, w, kw, sw, dw, off);
            for (int64_t j = j1; j < ow; j++)
                pool_row_edge(xp + r * w, r * w, hm + r * ow, hi ? hi + r * ow : NULL, j, w, kw, sw, dw, off);
        }
        return;
    }
    for (int64_t r = 0; r < h; r++) {
        float* m = hm + r * ow;
        int64_t* at = hi ? hi + r * ow : NULL;
        for (int64_t j = 0; j < j0 && j < ow; j++)
            pool_row_edge(xp + r * w, r * w, m, at, j, w, kw, sw, dw, off);
        if (j0 < j1) {
            pool_row_fold(xp + r * w, m, at, j0, j1, kw, sw, dw, off);
            if (at)
                for (int64_t j = j0; j < j1; j++)
                    at[j] += r * w;
        }
        for (int64_t j = j1 > j0 ? j1 : j0; j < ow; j++)
            pool_row_edge(xp + r * w, r * w, m, at, j, w, kw, sw, dw, off);
    }
}

/* 2-D max pooling of `planes` contiguous h × w float32 planes into oh × ow ones, any window
 * (kh × kw, stride sh × sw, padding ph × pw, dilation dh × dw; ceil_mode=False; every window
 * holds at least one element, as PyTorch's limit on the padding ensures): ATen's values, and with
 * `idx` its indices, bit for bit. ATen visits a window's elements row by row and keeps the first
 * maximum (the last NaN); folding each row first and then the rows' results in order under the
 * same rule picks the same element, so each row's maxima are taken once per input row (vector
 * loops over columns) and the rows of each window combined after. 3 × 3 windows with stride 2
 * and padding 1 (resnet's stem pool, 16 × 64 × 32 × 32): 0.9 ms with indices, 0.6 without,
 * against ATen's 6 ms. `scratch` (and `scratch_idx` with `idx`) holds h·ow elements per thread.
 * Returns 0, or 1 without writing anything where a dilated window misses the input altogether
 * (ATen gives −∞ there, with an index past its window's first tap: left to ATen). */
int max_pool2d_f32(const float* x, float* out, int64_t* idx, float* scratch, int64_t* scratch_idx, int64_t planes,
                   int64_t h, int64_t w, int64_t oh, int64_t ow, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                   int64_t ph, int64_t pw, int64_t dh, int64_t dw, int threads) {
    if (!window_taps_input(oh, h, kh, sh, ph, dh) || !window_taps_input(ow, w, kw, sw, pw, dw))
        return 1;
    int64_t j0 = ceil_div(pw, sw);                                 /* the first column whose window is in the row */
    int64_t j1 = floor_div(w - 1 + pw - (kw - 1) * dw, sw) + 1;    /* past the last */
    if (j1 > ow)
        j1 = ow;
    if (j1 < j0)
        j1 = j0;
#pragma omp parallel num_threads(threads) if (threads > 1 && planes * oh * ow >= PARALLEL_MIN)
    {
#ifdef _OPENMP
        int64_t t = omp_get_thread_num();
#else
        int64_t t = 0;
#endif
        float* hm = scratch + t * h * ow;
        int64_t* hi = idx ? scratch_idx + t * h * ow : NULL;
#pragma omp for schedule(static)
        for (int64_t q = 0; q < planes; q++) {
            const float* xp = x + q * h * w;
            if (kw == 3 && sw == 2 && dw == 1)
                pool_rows(xp, hm, hi, h, w, ow, 3, 2, 1, pw, j0, j1);
            else if (kw == 3 && sw == 1 && dw == 1)
                pool_rows(xp, hm, hi, h, w, ow, 3, 1, 1, pw, j0, j1);
            else if (kw == 2 && sw == 2 && dw == 1)
                pool_rows(xp, hm, hi, h, w, ow, 2, 2, 1, pw, j0, j1);
            else
                pool_rows(xp, hm, hi, h, w, ow, kw, sw, dw, pw, j0, j1);
            for (int64_t i = 0; i < oh; i++) {
                float* m = out + (q * oh + i) * ow;
                int64_t* at = idx ? idx + (q * oh + i) * ow : NULL;
                int64_t r0 = i * sh - ph;
                int64_t a0 = r0 < 0 ? ceil_div(-r0, dh) : 0, a1 = kh;
                while (a1 > a0 && r0 + (a1 - 1) * dh >= h)
                    a1--;
                const float* first = hm + (r0 + a0 * dh) * ow;
                for (int64_t j = 0; j < ow; j++)
                    m[j] = first[j];
                if (at) {
                    const int64_t* first_at = hi + (r0 + a0 * dh) * ow;
                    for (int64_t j = 0; j < ow; j++)
                        at[j] = first_at[j];
                    for (int64_t a = a0 + 1; a < a1; a++) {
                        const float* row = hm + (r0 + a * dh) * ow;
                        const int64_t* row_at = hi + (r0 + a * dh) * ow;
#pragma omp simd
                        for (int64_t j = 0; j < ow; j++) {
                            float v = row[j];
                            int take = (v > m[j]) | (v != v);
                            m[j] = take ? v : m[j];
                            at[j] = take ? row_at[j] : at[j];
                        }
                    }
                } else {
                    for (int64_t a = a0 + 1; a < a1; a++) {
                        const float* row = hm + (r0 + a * dh) * ow;
#pragma omp simd
                        for (int64_t j = 0; j < ow; j++)
                            m[j] = max_nan(m[j], row[j]);
                    }
                }
            }
        }
    }
    return 0;
}

/* SOAP's projection over a small leading dimension (a convolution kernel's 3 of a 3 × 3, a 1 × 1
 * kernel's 1): out (count × p) = xᵀ·m for x (n × count) and m (n × p), all contiguous, each
 * element as ((x₀·m₀ⱼ + x₁·m₁ⱼ) + …) + x_{n−1}·m_{n−1,j}, every product and sum rounded (no
 * fusing) — how MKL's GEMM forms tensordot(x, m, dims=[[0], [0]]) for such shapes on this
 * project's machine, where that call takes 9 ms for a 512 × 512 × 3 × 3 tensor (its operand
 * is a transposed view, K = 3). The caller checks the bits against tensordot once per shape. */
void small_contract_f32(const float* x, const float* m, float* out, int64_t n, int64_t p, int64_t count, int threads) {
    enum { BLOCK = 256 }; /* p ≤ SMALL_CONTRACT_MAX rows of it: 8 KB */
    int64_t blocks = (count + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && count * p >= PARALLEL_MIN)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * BLOCK, len = start + BLOCK < count ? BLOCK : count - start;
        float acc[SMALL_CONTRACT_MAX][BLOCK];
        for (int64_t j = 0; j < p; j++) {
            float m0 = m[j];
            const float* x0 = x + start;
            float* a = acc[j];
#pragma GCC ivdep
            for (int64_t i = 0; i < len; i++)
                a[i] = x0[i] * m0;
            for (int64_t k = 1; k < n; k++) {
                float mk = m[k * p + j];
                const float* xk = x + k * count + start;
#pragma GCC ivdep
                for (int64_t i = 0; i < len; i++)
                    a[i] = a[i] + xk[i] * mk;
            }
        }
        float* o = out + start * p;
        if (p == 1) {
            for (int64_t i = 0; i < len; i++)
                o[i] = acc[0][i];
        } else if (p == 3) { /* (a 3 × 3 kernel's: interleaved with a constant stride, vectorisable) */
            for (int64_t i = 0; i < len; i++) {
                o[3 * i] = acc[0][i];
                o[3 * i + 1] = acc[1][i];
                o[3 * i + 2] = acc[2][i];
            }
        } else {
            for (int64_t i = 0; i < len; i++)
                for (int64_t j = 0; j < p; j++)
                    o[i * p + j] = acc[j][i];
        }
    }
}
