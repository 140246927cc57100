// A prefill chunk's causal attention over the paged KV cache, flash-attention style.

#include "ops.h"
#include "common.h"
#include "paged.h"

namespace glm47::cpu {

// ---- prefill attention: flash attention over the paged cache, many queries per sequence

// Keys per block of the online softmax. A block's packed K and V (64 keys x D) stay in L1 while a task's rows use them.
constexpr int64_t KB = 64;

// For the score GEMM, keys [s0, s0 + KB) of one KV head packed as out[dp * KB + j] = the 32-bit pair
// (k_{s0+j}[2dp], k_{s0+j}[2dp + 1]), zeros past len: one dpbf16 then multiplies a query's broadcast pair with
// 16 keys at once, so no horizontal sums are needed.
template <typename RowAt>
void pack_keys(const RowAt& row_at, int64_t s0, int64_t len, int64_t D, uint32_t* out) {
  for (int64_t j = 0; j < KB; ++j) {
    if (s0 + j < len) {
      const uint32_t* k = reinterpret_cast<const uint32_t*>(row_at(s0 + j));
      for (int64_t dp = 0; dp < D / 2; ++dp) out[dp * KB + j] = k[dp];
    } else {
      for (int64_t dp = 0; dp < D / 2; ++dp) out[dp * KB + j] = 0;
    }
  }
}

// For the P.V GEMM, values [s0, s0 + KB) packed by pairs of keys: out[jp * D + d] = (v_{2jp}[d], v_{2jp+1}[d]),
// zeros past len: one dpbf16 multiplies a row's broadcast pair of probabilities with 16 dims of two values.
template <typename RowAt>
void pack_values(const RowAt& row_at, int64_t s0, int64_t len, int64_t D, uint32_t* out) {
  const __m512i lo = pairs_index(0), hi = pairs_index(16);
  for (int64_t jp = 0; jp < KB / 2; ++jp) {
    const int64_t s = s0 + 2 * jp;
    uint32_t* o = out + jp * D;
    for (int64_t d = 0; d < D; d += 32) {
      const __m512i a = s < len ? _mm512_loadu_si512(row_at(s) + d) : _mm512_setzero_si512();
      const __m512i b = s + 1 < len ? _mm512_loadu_si512(row_at(s + 1) + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(o + d, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(o + d + 16, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

// s[m * KB + j] = scale * dot(q_m, k_j) for MT query rows (pointers) and the keys [16 c0, 16 c0 + 16 NC) of a
// packed block: per pair of dims, NC key loads and MT query broadcasts feed MT * NC dpbf16.
template <int MT, int NC>
inline void score_tile(const bf16* const* q, const uint32_t* kp, int64_t D, float scale, float* s, int c0) {
  __m512 acc[MT][NC];
  for (int m = 0; m < MT; ++m)
    for (int c = 0; c < NC; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t dp = 0; dp < D / 2; ++dp) {
    const uint32_t* k = kp + dp * KB + 16 * c0;
    __m512bh kv[NC];
    for (int c = 0; c < NC; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(k + 16 * c);
    for (int m = 0; m < MT; ++m) {
      uint32_t pair;
      std::memcpy(&pair, q[m] + 2 * dp, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int c = 0; c < NC; ++c) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], a, kv[c]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int m = 0; m < MT; ++m)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(s + m * KB + 16 * (c0 + c), _mm512_mul_ps(acc[m][c], sc));
}

// o[m][d0 : d0 + 16 ND] = o[m][...] * alpha[m] + sum_j p[m][j] v_j[...] for MT rows (o float32, row stride D; p bf16,
// row stride KB) and the first 2 * pairs keys of a packed value block: per pair of keys, ND value loads and MT
// probability broadcasts feed MT * ND dpbf16.
template <int MT, int ND>
inline void pv_tile(const bf16* p, const uint32_t* vp, int64_t D, int64_t d0, int64_t pairs, const float* alpha,
                    float* o) {
  __m512 acc[MT][ND];
  for (int m = 0; m < MT; ++m) {
    const __m512 a = _mm512_set1_ps(alpha[m]);
    for (int c = 0; c < ND; ++c) acc[m][c] = _mm512_mul_ps(_mm512_loadu_ps(o + m * D + d0 + 16 * c), a);
  }
  for (int64_t jp = 0; jp < pairs; ++jp) {
    const uint32_t* v = vp + jp * D + d0;
    __m512bh vc[ND];
    for (int c = 0; c < ND; ++c) vc[c] = (__m512bh)_mm512_loadu_si512(v + 16 * c);
    for (int m = 0; m < MT; ++m) {
      uint32_t pair;
      std::memcpy(&pair, p + m * KB + 2 * jp, 4);
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int c = 0; c < ND; ++c) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], pb, vc[c]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int c = 0; c < ND; ++c) _mm512_storeu_ps(o + m * D + d0 + 16 * c, acc[m][c]);
}

// Causal attention of one sequence's chunk of n queries (positions ctx .. ctx + n - 1) over its keys 0 .. ctx + n - 1
// in the paged cache (the chunk's own K/V already written), flash-attention style: K and V packed once per block
// and KV head, then tasks of (KV head, a few query positions x the G heads sharing it) walk the key blocks with an
// online softmax in float32. Like SDPA's CPU flash kernel, the probabilities are rounded to bf16 for the
// weighted sum of V and the sum that divides the result is of the unrounded ones. q (n, H, D) bf16.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& block_table, int64_t ctx, double scale) {
  check_attention(q, k_cache, v_cache);
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), bs = k_cache.size(1), Hkv = k_cache.size(2);
  const at::Tensor table = block_table.to(at::kLong).contiguous();
  const int64_t len = ctx + n, nblocks = (len + KB - 1) / KB;
  TORCH_CHECK(ctx >= 0 && table.dim() == 1 && table.size(0) * bs >= len, "block_table ", table.sizes(),
              " does not cover ", len, " keys");
  const int64_t G = H / Hkv, W = D / 2;
  const int64_t* tp = table.data_ptr<int64_t>();
  const bf16 *qp = q.data_ptr<bf16>(), *kp = k_cache.data_ptr<bf16>(), *vp = v_cache.data_ptr<bf16>();
  at::Tensor out = at::empty_like(q);
  bf16* op = out.data_ptr<bf16>();
  const float sc = static_cast<float>(scale);

  // 1. pack K and V: (Hkv, nblocks) blocks of KB keys, each W * KB words of keys then KB / 2 * D words of values
  const int64_t block_words = W * KB + KB / 2 * D;
  std::vector<uint32_t> packed(Hkv * nblocks * block_words);
  run_tasks(Hkv * nblocks, [&](int64_t t) {
    const int64_t g = t / nblocks, b = t % nblocks;
    const PagedRows rows(tp, bs, Hkv, D, g);
    const auto row = [&](const bf16* cache) { return [=](int64_t s) { return rows(cache, s); }; };
    uint32_t* dst = packed.data() + t * block_words;
    pack_keys(row(kp), b * KB, len, D, dst);
    pack_values(row(vp), b * KB, len, D, dst + W * KB);
  });

  // 2. tasks: KV head g and positions [i0, i0 + mq) of the chunk, their R = mq * G rows (row r: position i0 + r / G,
  //    head g * G + r % G); the last positions (the most keys) first, so the short tasks fill in at the end.
  const int64_t mq = std::max<int64_t>(1, 32 / G), qblocks = (n + mq - 1) / mq;
  run_tasks(Hkv * qblocks, [&](int64_t t) {
    const int64_t g = t % Hkv, i0 = (qblocks - 1 - t / Hkv) * mq, m_pos = std::min(mq, n - i0), R = m_pos * G;
    const int64_t keys = ctx + i0 + m_pos;  // keys the last row sees
    std::vector<const bf16*> rows(R);
    for (int64_t r = 0; r < R; ++r) rows[r] = qp + ((i0 + r / G) * H + g * G + r % G) * D;
    std::vector<float> s(R * KB), o(R * D, 0.f), mx(R, -INFINITY), sum(R, 0.f), alpha(R);
    std::vector<bf16> p(R * KB + 2);
    for (int64_t b = 0; b * KB < keys; ++b) {
      const uint32_t* blk = packed.data() + (g * nblocks + b) * block_words;
      int64_t r = 0;
      for (; r + 8 <= R; r += 8)  // 8 rows x 32 keys: half the key loads of 4 x 64
        for (int c0 = 0; c0 < 4; c0 += 2) score_tile<8, 2>(rows.data() + r, blk, D, sc, s.data() + r * KB, c0);
      for (; r < R; ++r) score_tile<1, 4>(rows.data() + r, blk, D, sc, s.data() + r * KB, 0);
      const int64_t used = std::min(KB, keys - b * KB);  // keys of this block any row sees
      for (r = 0; r < R; ++r) {
        const int64_t sees = std::min<int64_t>(used, ctx + i0 + r / G + 1 - b * KB);  // keys this row sees here
        float* sr = s.data() + r * KB;
        bf16* pr = p.data() + r * KB;
        if (sees <= 0) {  // the whole block is in this row's future
          alpha[r] = 1.f;
          std::fill_n(pr, KB, bf16(0.f));
          continue;
        }
        __mmask16 valid[KB / 16];
        __m512 vmax = _mm512_set1_ps(mx[r]);
        for (int64_t j = 0; j < KB; j += 16) {
          valid[j / 16] = lanes16(sees - j);
          vmax = _mm512_mask_max_ps(vmax, valid[j / 16], vmax, _mm512_loadu_ps(sr + j));
        }
        const float m = _mm512_reduce_max_ps(vmax);
        alpha[r] = std::exp(mx[r] - m);  // 0 for the first block (mx = -inf)
        mx[r] = m;
        __m512 total = _mm512_setzero_ps();
        for (int64_t j = 0; j < KB; j += 16) {
          const __m512 e = _mm512_maskz_mov_ps(valid[j / 16], exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + j),
                                                                                  _mm512_set1_ps(m))));
          total = _mm512_add_ps(total, e);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + j), round_bf16x16(e));
        }
        sum[r] = sum[r] * alpha[r] + _mm512_reduce_add_ps(total);
      }
      const int64_t pairs = (used + 1) / 2;
      const uint32_t* vals = blk + W * KB;
      for (r = 0; r + 4 <= R; r += 4) {  // 4 rows x 64 dims: half the value loads of 2 x 128
        for (int64_t d0 = 0; d0 + 64 <= D; d0 += 64)
          pv_tile<4, 4>(p.data() + r * KB, vals, D, d0, pairs, alpha.data() + r, o.data() + r * D);
        if (D % 64)  // D is a multiple of 32
          pv_tile<4, 2>(p.data() + r * KB, vals, D, D - 32, pairs, alpha.data() + r, o.data() + r * D);
      }
      for (; r < R; ++r)
        for (int64_t d0 = 0; d0 < D; d0 += 32)
          pv_tile<1, 2>(p.data() + r * KB, vals, D, d0, pairs, alpha.data() + r, o.data() + r * D);
    }
    for (int64_t r = 0; r < R; ++r) {
      const __m512 inv = _mm512_set1_ps(1.f / sum[r]);
      bf16* dst = op + ((i0 + r / G) * H + g * G + r % G) * D;
      for (int64_t d = 0; d < D; d += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d),
                            round_bf16x16(_mm512_mul_ps(_mm512_loadu_ps(o.data() + r * D + d), inv)));
    }
  });
  return out;
}

}  // namespace glm47::cpu
