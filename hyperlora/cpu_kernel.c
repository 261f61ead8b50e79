/*
 * Native CPU kernel of ComfyUI-HyperLoRA: row dot products of an fp16 basis (see cpu_kernel.py).
 *
 * A group of the LoRA basis is one contiguous fp16 buffer [M, N, K] (K contiguous) and one fp32
 * coefficient matrix [M, K].  hl_rowdot_f16 computes, for the flattened rows r in [r0, r1)
 * (row r belongs to matrix m = r / N):
 *
 *     out[r] = fp16( sum_k basis[r, k] * coeffs[m, k] )        (fp32 arithmetic)
 *
 * The sum of one row is always evaluated in the same order, whichever rows a call covers: eight
 * fp32 lanes j (lane j sums k = j, j + 8, j + 16, ... with fused multiply-adds, in increasing k),
 * then ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), then one round-to-nearest-even to fp16.
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

/* fp32 lanes of one row: lane j = fma chain over k = j, j + 8, ... */
HL_TARGET static inline __m256 row_lanes(const uint16_t *row, const float *c, int64_t k) {
    __m256 s = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; j += 8)
        s = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + j))), _mm256_loadu_ps(c + j), s);
    return s;
}

/* rows [0, n) of one matrix: a [n, k] fp16, c [k] fp32, y [n] fp16; k % 8 == 0 */
HL_TARGET static void rows_f16(const uint16_t *a, const float *c, uint16_t *y, int64_t n, int64_t k) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        /* eight named accumulators (an array would live on the stack with some compilers) */
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
        const uint16_t *row = a + i * k;
        /* software prefetch into L2 of the block four blocks ahead: hardware prefetch alone leaves
           one core at about 2/3 of a plain streaming read (T1 measured better than T0 and NTA);
           prefetching past the end of the buffer cannot fault */
        const char *ahead = (const char *)(row + 32 * k);
        for (int64_t j = 0; j < k; j += 8) {
            _mm_prefetch(ahead + 16 * j, _MM_HINT_T1);
            _mm_prefetch(ahead + 16 * j + 64, _MM_HINT_T1);
            const __m256 cj = _mm256_loadu_ps(c + j);
#define HL_ACC(s, r) s = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + (r) * k + j))), cj, s)
            HL_ACC(s0, 0); HL_ACC(s1, 1); HL_ACC(s2, 2); HL_ACC(s3, 3);
            HL_ACC(s4, 4); HL_ACC(s5, 5); HL_ACC(s6, 6); HL_ACC(s7, 7);
#undef HL_ACC
        }
        /* per row: [(l0+l1)+(l2+l3) in the low 128-bit half, (l4+l5)+(l6+l7) in the high half] */
        const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
        const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(s4, s5), _mm256_hadd_ps(s6, s7));
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
