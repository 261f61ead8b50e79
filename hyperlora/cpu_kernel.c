/*
 * Native CPU kernel of ComfyUI-HyperLoRA: row dot products of an fp16 basis (see cpu_kernel.py).
 *
 * A group of the LoRA basis is one contiguous fp16 buffer [M, N, K] (K contiguous) and one fp32
 * coefficient matrix [M, K].  hl_rowdot_f16 computes, for the flattened rows r in [r0, r1)
 * (row r belongs to matrix m = r / N):
 *
 *     out[r] = fp16( sum_k basis[r, k] * coeffs[m, k] )        (fp32 arithmetic)
 *
 * The sum of one row is always evaluated in the same order, whichever rows a call covers: the row
 * is read in chunks q of 8 values (k = 8q .. 8q + 7); chunk q is multiplied into accumulator
 * q % 2 (eight fp32 lanes each, fused multiply-add, increasing q); the lanes l = even + odd are
 * summed as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)); one round-to-nearest-even to fp16.
 * So splitting the rows over threads never changes a bit of the result.
 *
 * Built at run time by cpu_kernel.py with the system C compiler (no -march flags: the AVX2 code
 * is enabled per function and chosen only when CPUID reports AVX, AVX2, FMA, F16C and the OS
 * saves the YMM registers).  On other CPUs hl_cpu_supported() returns 0 and Python keeps
 * PyTorch's mat-vec.
 */
#include <stdint.h>

#define HL_ABI 1

int hl_abi(void) { return HL_ABI; }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>

#define HL_TARGET __attribute__((target("avx,avx2,fma,f16c")))

static int cpu_check(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const unsigned int fma = 1u << 12, osxsave = 1u << 27, avx = 1u << 28, f16c = 1u << 29;
    if ((c & (fma | osxsave | avx | f16c)) != (fma | osxsave | avx | f16c)) return 0;
    unsigned int xcr0_lo, xcr0_hi;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & 6u) != 6u) return 0; /* XMM and YMM state enabled by the OS */
    if (__get_cpuid_max(0, 0) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b & (1u << 5)) ? 1 : 0; /* AVX2 */
}

/* CPUID traps to the hypervisor in VMs: ask once (a benign race writes the same value). */
static volatile int cpu_ok = -1;

int hl_cpu_supported(void) {
    if (cpu_ok < 0) cpu_ok = cpu_check();
    return cpu_ok;
}

#define HL_LOAD(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))

/* fp32 lanes of one row: chunk q (elements 8q .. 8q+7) goes into accumulator q % 2 by FMA in
   increasing q; the lanes are even + odd */
HL_TARGET static inline __m256 row_lanes(const uint16_t *row, const float *c, int64_t k) {
    __m256 e = _mm256_setzero_ps(), o = e;
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
        e = _mm256_fmadd_ps(HL_LOAD(row + j), _mm256_loadu_ps(c + j), e);
        o = _mm256_fmadd_ps(HL_LOAD(row + j + 8), _mm256_loadu_ps(c + j + 8), o);
    }
    if (j < k) e = _mm256_fmadd_ps(HL_LOAD(row + j), _mm256_loadu_ps(c + j), e);
    return _mm256_add_ps(e, o);
}

/* four rows at once: eight independent FMA chains, and each iteration reads 32 contiguous bytes of
   every row (measured: 1.05-1.16x a plain streaming read on two cores, where eight rows with one
   chain each reached 1.2-1.5x; software prefetch made this layout slower) */
HL_TARGET static inline void four_rows(const uint16_t *row, const float *c, int64_t k, __m256 *s) {
    __m256 e0 = _mm256_setzero_ps(), o0 = e0, e1 = e0, o1 = e0, e2 = e0, o2 = e0, e3 = e0, o3 = e0;
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
        const __m256 ce = _mm256_loadu_ps(c + j), co = _mm256_loadu_ps(c + j + 8);
        e0 = _mm256_fmadd_ps(HL_LOAD(row + j), ce, e0);
        o0 = _mm256_fmadd_ps(HL_LOAD(row + j + 8), co, o0);
        e1 = _mm256_fmadd_ps(HL_LOAD(row + k + j), ce, e1);
        o1 = _mm256_fmadd_ps(HL_LOAD(row + k + j + 8), co, o1);
        e2 = _mm256_fmadd_ps(HL_LOAD(row + 2 * k + j), ce, e2);
        o2 = _mm256_fmadd_ps(HL_LOAD(row + 2 * k + j + 8), co, o2);
        e3 = _mm256_fmadd_ps(HL_LOAD(row + 3 * k + j), ce, e3);
        o3 = _mm256_fmadd_ps(HL_LOAD(row + 3 * k + j + 8), co, o3);
    }
    if (j < k) {
        const __m256 ce = _mm256_loadu_ps(c + j);
        e0 = _mm256_fmadd_ps(HL_LOAD(row + j), ce, e0);
        e1 = _mm256_fmadd_ps(HL_LOAD(row + k + j), ce, e1);
        e2 = _mm256_fmadd_ps(HL_LOAD(row + 2 * k + j), ce, e2);
        e3 = _mm256_fmadd_ps(HL_LOAD(row + 3 * k + j), ce, e3);
    }
    s[0] = _mm256_add_ps(e0, o0);
    s[1] = _mm256_add_ps(e1, o1);
    s[2] = _mm256_add_ps(e2, o2);
    s[3] = _mm256_add_ps(e3, o3);
}

/* rows [0, n) of one matrix: a [n, k] fp16, c [k] fp32, y [n] fp16; k % 8 == 0 */
HL_TARGET static void rows_f16(const uint16_t *a, const float *c, uint16_t *y, int64_t n, int64_t k) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 s[8];
        four_rows(a + i * k, c, k, s);
        four_rows(a + (i + 4) * k, c, k, s + 4);
        /* per row: [(l0+l1)+(l2+l3) in the low 128-bit half, (l4+l5)+(l6+l7) in the high half] */
        const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
        const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
        const __m256 lo = _mm256_permute2f128_ps(h0, h1, 0x20), hi = _mm256_permute2f128_ps(h0, h1, 0x31);
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_add_ps(lo, hi), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; i++) { /* the same sums as above, one row at a time */
        __m256 t = row_lanes(a + i * k, c, k);
        t = _mm256_hadd_ps(t, t);
        t = _mm256_hadd_ps(t, t);
        const __m128 r = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        y[i] = (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT), 0);
    }
}

/* Returns 0 on success, -1 on bad arguments (k not a positive multiple of 8, bad row range). */
int hl_rowdot_f16(const uint16_t *basis, const float *coeffs, uint16_t *out, int64_t n, int64_t k,
                  int64_t r0, int64_t r1) {
    if (n <= 0 || k <= 0 || k % 8 != 0 || r0 < 0 || r1 < r0) return -1;
    if (!hl_cpu_supported()) return -2;
    while (r0 < r1) {
        const int64_t m = r0 / n;
        int64_t end = (m + 1) * n;
        if (end > r1) end = r1;
        rows_f16(basis + r0 * k, coeffs + m * k, out + r0, end - r0, k);
        r0 = end;
    }
    return 0;
}

#else /* not x86-64 with GCC/Clang: no native kernel */

int hl_cpu_supported(void) { return 0; }

int hl_rowdot_f16(const uint16_t *basis, const float *coeffs, uint16_t *out, int64_t n, int64_t k,
                  int64_t r0, int64_t r1) {
    (void)basis; (void)coeffs; (void)out; (void)n; (void)k; (void)r0; (void)r1;
    return -2;
}

#endif
