// The two matrix-product schemes the kernels share, both dpbf16 with float32 sums:
//  - dot products (dot_tile, gemm_tiles/gemm_rows): a few rows of x against row-major weights, horizontal sums;
//    reads the weights in place once for all rows (decode steps);
//  - packed tokens (pack_group, vnni_tile, vnni_rows): x packed by 16 rows into pairs along k, weight pairs
//    broadcast, no horizontal sums (prefill chunks).
#pragma once

#include "common.h"

namespace glm47::cpu {

// out[4 * m + j] = dot(x[m], W row j) for m < MT rows of x and the 4 rows of W given by pointer (all K long):
// 16 independent dpbf16 chains at MT = 4. Meanwhile it prefetches the pf_bytes at pf into L1, a few lines per
// k step in address order: the caller spreads the next block over its tiles, so that memory streams while
// the tiles compute (one sequential stream; the 4 rows read side by side alone get ~2/3 of the bandwidth).
template <int MT>
inline void dot_tile(const bf16* x, int64_t ldx, const bf16* const* w, int64_t K, float* out, const char* pf,
                     int64_t pf_bytes) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t steps = std::max<int64_t>(K / 32, 1);
  const int64_t per_step = (pf_bytes / 64 + steps - 1) / steps * 64;  // bytes prefetched per k step
  int64_t k = 0;
  for (const char* p = pf; k + 32 <= K; k += 32, p += per_step) {
    for (int64_t off = 0; off < per_step; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
    const __m512bh w0 = load_bh(w[0] + k), w1 = load_bh(w[1] + k), w2 = load_bh(w[2] + k), w3 = load_bh(w[3] + k);
    for (int m = 0; m < MT; ++m) {
      const __m512bh a = load_bh(x + m * ldx + k);
      acc[4 * m + 0] = _mm512_dpbf16_ps(acc[4 * m + 0], a, w0);
      acc[4 * m + 1] = _mm512_dpbf16_ps(acc[4 * m + 1], a, w1);
      acc[4 * m + 2] = _mm512_dpbf16_ps(acc[4 * m + 2], a, w2);
      acc[4 * m + 3] = _mm512_dpbf16_ps(acc[4 * m + 3], a, w3);
    }
  }
  if (k < K) {  // tail of fewer than 32: masked loads read zeros past the end
    const __mmask32 mask = (__mmask32)((1u << (K - k)) - 1);
    const __m512bh w0 = load_bh(w[0] + k, mask), w1 = load_bh(w[1] + k, mask), w2 = load_bh(w[2] + k, mask),
                   w3 = load_bh(w[3] + k, mask);
    for (int m = 0; m < MT; ++m) {
      const __m512bh a = load_bh(x + m * ldx + k, mask);
      acc[4 * m + 0] = _mm512_dpbf16_ps(acc[4 * m + 0], a, w0);
      acc[4 * m + 1] = _mm512_dpbf16_ps(acc[4 * m + 1], a, w1);
      acc[4 * m + 2] = _mm512_dpbf16_ps(acc[4 * m + 2], a, w2);
      acc[4 * m + 3] = _mm512_dpbf16_ps(acc[4 * m + 3], a, w3);
    }
  }
  _mm512_storeu_ps(out, reduce16(acc));
}

// For rows [n0, n1) of W (N rows of K, contiguous) and all M rows of x: calls store(m, n, float sum). W is read
// in blocks of 4 rows; a block serves every row of x from L1 while the next block is prefetched, and the last
// block prefetches `then` (where the caller reads next) when given, else the rows after n1.
template <typename Store>
inline void gemm_rows(const bf16* x, int64_t ldx, int64_t M, const bf16* W, int64_t N, int64_t K, int64_t n0,
                      int64_t n1, const Store& store, const bf16* then = nullptr) {
  alignas(64) float out[16];
  const bf16* w[4];
  const int64_t tiles = (M + 3) / 4, block = 4 * K * 2;  // a block's bytes
  const int64_t share = (block / 64 + tiles - 1) / tiles * 64;  // of the next block, prefetched by each tile
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t nn = std::min<int64_t>(4, n1 - n);
    for (int j = 0; j < 4; ++j) w[j] = W + std::min(n + j, N - 1) * K;  // a short block repeats its last row
    const bool last = n + 4 >= n1;
    const char* next = reinterpret_cast<const char*>(last && then ? then : W + (n + 4) * K);
    const int64_t ahead = last && then ? block : std::max<int64_t>(0, std::min<int64_t>(block, (N - n - 4) * K * 2));
    for (int64_t m = 0, t = 0; m < M; m += 4, ++t) {
      const int64_t mt = std::min<int64_t>(4, M - m), off = std::min(t * share, ahead);
      const int64_t bytes = std::min(share, ahead - off);
      const bf16* xm = x + m * ldx;
      switch (mt) {
        case 1: dot_tile<1>(xm, ldx, w, K, out, next + off, bytes); break;
        case 2: dot_tile<2>(xm, ldx, w, K, out, next + off, bytes); break;
        case 3: dot_tile<3>(xm, ldx, w, K, out, next + off, bytes); break;
        default: dot_tile<4>(xm, ldx, w, K, out, next + off, bytes); break;
      }
      for (int64_t i = 0; i < mt; ++i)
        for (int64_t j = 0; j < nn; ++j) store(m + i, n + j, out[4 * i + j]);
    }
  }
}

// A group of n <= 16 rows of K bf16 (K even) packed by pairs: out[kp * 16 + i] = the 32-bit pair
// (row_i[2kp], row_i[2kp + 1]), zeros for i >= n (zero: K / 2 zero words). row_at(i) points at row i.
template <typename RowAt>
inline void pack_group(const RowAt& row_at, int64_t n, int64_t K, const uint32_t* zero, uint32_t* out) {
  const uint32_t* row[16];
  for (int64_t i = 0; i < 16; ++i) row[i] = i < n ? reinterpret_cast<const uint32_t*>(row_at(i)) : zero;
  int64_t kp = 0;
  for (; kp + 16 <= K / 2; kp += 16) {
    const uint32_t* src[16];
    for (int i = 0; i < 16; ++i) src[i] = row[i] + kp;
    transpose16(src, out + kp * 16, 16);
  }
  for (; kp < K / 2; ++kp)
    for (int i = 0; i < 16; ++i) out[kp * 16 + i] = row[i][kp];
}

// out[r * 16 * NG + 16 * g + i] = dot(w_r, token i of group g) for 8 weight rows (pointers, K = 2 KP long) and NG
// groups of 16 packed tokens (group g at xp + g * gstride): per pair of k, NG loads and 8 broadcasts feed 8 * NG
// dpbf16, with no horizontal sums.
template <int NG>
inline void vnni_tile(const bf16* const* w, const uint32_t* xp, int64_t gstride, int64_t KP, float* out) {
  __m512 acc[8][NG];
  for (int r = 0; r < 8; ++r)
    for (int g = 0; g < NG; ++g) acc[r][g] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < KP; ++kp) {
    __m512bh xv[NG];
    for (int g = 0; g < NG; ++g) xv[g] = (__m512bh)_mm512_loadu_si512(xp + g * gstride + kp * 16);
    for (int r = 0; r < 8; ++r) {
      uint32_t pair;
      std::memcpy(&pair, w[r] + 2 * kp, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int g = 0; g < NG; ++g) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], a, xv[g]);
    }
  }
  for (int r = 0; r < 8; ++r)
    for (int g = 0; g < NG; ++g) _mm512_storeu_ps(out + r * 16 * NG + 16 * g, acc[r][g]);
}

// For rows [n0, n1) of W (row-major, K long) and the tokens packed in `groups` groups of 16 (group g at
// xp + g * gstride): out[(n - n0) * ldo + 16 g + i] = dot(W row n, token i of group g), float32, one vector store
// per row and group. Weight rows go 8 at a time (a short tile repeats its last row), each tile serving every group
// from L1, two groups per pass (callers pass at most 16 groups, 256 tokens, which stay in L2 meanwhile). Each tile
// prefetches the next one; the last prefetches the 8 rows at `then` (where the caller reads next), when given.
inline void vnni_rows(const uint32_t* xp, int64_t gstride, int64_t groups, const bf16* W, int64_t K, int64_t n0,
                      int64_t n1, float* out, int64_t ldo, const bf16* then = nullptr) {
  alignas(64) float tile[8 * 32];
  const bf16* w[8];
  for (int64_t n = n0; n < n1; n += 8) {
    const int64_t nr = std::min<int64_t>(8, n1 - n);
    for (int r = 0; r < 8; ++r) w[r] = W + (n + std::min<int64_t>(r, nr - 1)) * K;
    const bool last = n + 8 >= n1;
    const char* next = reinterpret_cast<const char*>(last ? then : W + (n + 8) * K);
    const int64_t ahead = !next ? 0 : last ? 8 : std::min<int64_t>(8, n1 - n - 8);
    for (int64_t off = 0; off < ahead * K * 2; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
    for (int64_t g = 0; g < groups; g += 2) {
      if (groups - g >= 2) vnni_tile<2>(w, xp + g * gstride, gstride, K / 2, tile);
      else vnni_tile<1>(w, xp + g * gstride, gstride, K / 2, tile);
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t c = 0; c < std::min<int64_t>(2, groups - g); ++c)
          _mm512_storeu_ps(out + (n - n0 + r) * ldo + 16 * (g + c),
                           _mm512_load_ps(tile + r * 16 * std::min<int64_t>(2, groups - g) + 16 * c));
    }
  }
}

// Groups of 16 tokens per block of the packed path: 256 tokens' activations stay in L2 while a block runs.
constexpr int64_t BLOCK_GROUPS = 16;

}  // namespace glm47::cpu
