// One query per sequence over the paged KV cache: split-K chunks, merged.

#include "ops.h"
#include "common.h"
#include "paged.h"

namespace glm47::cpu {

// scores[h][s] = scale * dot(q[h], k[s]) for G query heads and the keys [0, len) of one KV head, 16 / G keys at a
// time so that one reduce16 yields them all. k_at(s) is the key's row in the cache.
template <int G, typename KeyAt>
inline void attention_scores(const bf16* q, int64_t D, int64_t len, const KeyAt& k_at, float scale, float* scores,
                             int64_t lds) {
  constexpr int KP = 16 / G;  // keys per pass
  __m512 acc[16];
  alignas(64) float r[16];
  for (int64_t s = 0; s < len; s += KP) {
    const bf16* k[KP];
    for (int j = 0; j < KP; ++j) k[j] = k_at(std::min(s + j, len - 1));
    for (int j = 0; j < KP && s + KEYS_AHEAD + j < len; ++j) prefetch_row(k_at(s + KEYS_AHEAD + j), D);
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      for (int h = 0; h < G; ++h) {
        const __m512bh qv = load_bh(q + h * D + d);
        for (int j = 0; j < KP; ++j) acc[h * KP + j] = _mm512_dpbf16_ps(acc[h * KP + j], qv, load_bh(k[j] + d));
      }
    }
    _mm512_store_ps(r, reduce16(acc));
    for (int h = 0; h < G; ++h)
      for (int j = 0; j < KP && s + j < len; ++j) scores[h * lds + s + j] = r[h * KP + j] * scale;
  }
}

// out[h * D + d0 + i] = sum_s p[h][s] v_s[d0 + i] for HG heads (probabilities p[h] at p + h * ldp, bf16, zero
// past len when len is odd) and dims [d0, d0 + 32) of the values v_at(s): per pair of keys, two loads interleaved
// into pairs feed 2 * HG dpbf16, so that each value is read once for all HG heads.
template <int HG, typename RowAt>
inline void pv_heads(const bf16* p, int64_t ldp, int64_t len, const RowAt& v_at, int64_t d0, float* out,
                     int64_t D) {
  const __m512i lo = pairs_index(0), hi = pairs_index(16);
  __m512 acc[HG][2];
  for (int h = 0; h < HG; ++h) acc[h][0] = acc[h][1] = _mm512_setzero_ps();
  for (int64_t s = 0; s < len; s += 2) {
    if (d0 == 0)  // the first pass brings in whole rows; the later ones find them in L2
      for (int64_t j = s + KEYS_AHEAD; j < std::min(len, s + KEYS_AHEAD + 2); ++j) prefetch_row(v_at(j), D);
    const __m512i a = _mm512_loadu_si512(v_at(s) + d0);
    const __m512i b = _mm512_loadu_si512(v_at(std::min(s + 1, len - 1)) + d0);  // its probability is 0 past len
    const __m512bh v_lo = (__m512bh)_mm512_permutex2var_epi16(a, lo, b);
    const __m512bh v_hi = (__m512bh)_mm512_permutex2var_epi16(a, hi, b);
    for (int h = 0; h < HG; ++h) {
      uint32_t pair;
      std::memcpy(&pair, p + h * ldp + s, 4);
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      acc[h][0] = _mm512_dpbf16_ps(acc[h][0], pb, v_lo);
      acc[h][1] = _mm512_dpbf16_ps(acc[h][1], pb, v_hi);
    }
  }
  for (int h = 0; h < HG; ++h) {
    _mm512_storeu_ps(out + h * D + d0, acc[h][0]);
    _mm512_storeu_ps(out + h * D + d0 + 16, acc[h][1]);
  }
}

// Heads taken at once by the score and P.V loops (their templates come in 8, 4, 2 and 1): the most that fit.
inline int64_t heads_at_once(int64_t left) { return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

// One query per sequence against its paged keys and values, as SDPA (flash, CPU) computes it for bf16 in a single
// KV block: float32 scores, softmax in float32 with the probabilities rounded to bf16 for the weighted sum of V
// and the reciprocal of the unrounded ones' sum scaling the result.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& lens, double scale) {
  check_attention(q, k_cache, v_cache);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), bs = k_cache.size(1), Hkv = k_cache.size(2);
  const at::Tensor tables = block_tables.to(at::kLong).contiguous(), ln = lens.to(at::kLong).contiguous();
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B && ln.numel() == B, "block_tables ", tables.sizes(),
              " and lens ", ln.sizes(), " must be (B, W) and (B,) with B=", B);
  const int64_t G = H / Hkv, W = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = ln.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= W * bs, "sequence ", b, " sees ", lp[b], " keys, its table holds ", W * bs);
  at::Tensor out = at::empty_like(q);
  const bf16 *qp = q.data_ptr<bf16>(), *kp = k_cache.data_ptr<bf16>(), *vp = v_cache.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const float sc = static_cast<float>(scale);

  // Tasks are (sequence, chunk of its keys), split-K: a long sequence spreads over every thread, and a task
  // reads its keys' rows for all KV heads, contiguous in the cache, while they are in L2. Each task leaves, per
  // query head, the chunk's max score, its sum of exp(score - max) and its unnormalised P.V; the chunks of a
  // sequence are merged after (one chunk: the plain softmax, as SDPA computes it for one KV block).
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> first(B + 1, 0), size(B);  // first task of each sequence, its chunk size
  for (int64_t b = 0; b < B; ++b) {
    const int64_t want = std::max<int64_t>((lp[b] + 511) / 512,  // <= 512 keys a chunk, and enough tasks
                                           std::min<int64_t>((2 * threads + B - 1) / B, (lp[b] + 63) / 64));
    size[b] = (lp[b] + want - 1) / want;
    first[b + 1] = first[b] + (lp[b] + size[b] - 1) / size[b];
  }
  const int64_t tasks = first[B];
  std::vector<float> part_max(tasks * H), part_sum(tasks * H), part_out(tasks * H * D);
  const auto merge = [&](int64_t b, int64_t h) {  // out[b, h] from the chunks' partial results
    float mx = -INFINITY;
    for (int64_t c = first[b]; c < first[b + 1]; ++c) mx = std::max(mx, part_max[c * H + h]);
    __m512 acc[16];  // D <= 256 here as 16 vectors; longer heads go 256 dims at a time
    for (int64_t d0 = 0; d0 < D; d0 += 256) {
      const int64_t nv = std::min<int64_t>(256, D - d0) / 16;
      float total = 0.f;
      for (int64_t i = 0; i < nv; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t c = first[b]; c < first[b + 1]; ++c) {
        const float w = std::exp(part_max[c * H + h] - mx);  // exactly 1 for a sequence in one chunk
        total += w * part_sum[c * H + h];
        const float* oc = part_out.data() + (c * H + h) * D + d0;
        for (int64_t i = 0; i < nv; ++i)
          acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(_mm512_loadu_ps(oc + 16 * i), _mm512_set1_ps(w)));
      }
      const __m512 inv = _mm512_set1_ps(1.f / total);
      bf16* dst = op + (b * H + h) * D + d0;
      for (int64_t i = 0; i < nv; ++i)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * i), round_bf16x16(_mm512_mul_ps(acc[i], inv)));
    }
  };
  run_tasks(tasks, [&](int64_t task) {
    const int64_t b = std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1;
    const int64_t s0 = (task - first[b]) * size[b], n = std::min(size[b], lp[b] - s0);
    std::vector<float> scores(G * n);
    std::vector<bf16> probs(G * (n + 1));
    for (int64_t g = 0; g < Hkv; ++g) {
      const PagedRows row(tp + b * W, bs, Hkv, D, g);  // key / value s of this sequence and KV head
      const auto k_at = [&](int64_t j) { return row(kp, s0 + j); };
      const auto v_at = [&](int64_t j) { return row(vp, s0 + j); };
      // 1. scores, G heads at a time in chunks of 8, 4, 2, 1
      for (int64_t h0 = 0, hg; h0 < G; h0 += hg) {
        const bf16* qh = qp + (b * H + g * G + h0) * D;
        float* sh = scores.data() + h0 * n;
        hg = heads_at_once(G - h0);
        switch (hg) {
          case 8: attention_scores<8>(qh, D, n, k_at, sc, sh, n); break;
          case 4: attention_scores<4>(qh, D, n, k_at, sc, sh, n); break;
          case 2: attention_scores<2>(qh, D, n, k_at, sc, sh, n); break;
          default: attention_scores<1>(qh, D, n, k_at, sc, sh, n); break;
        }
      }
      // 2. softmax within the chunk: p = exp(score - max) rounded to bf16 (padded to an even count with a zero),
      //    the sum of the unrounded ones
      for (int64_t h = 0; h < G; ++h) {
        const float* sh = scores.data() + h * n;
        bf16* ph = probs.data() + h * (n + 1);
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sh[j]);
        __m512 total = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
          const __mmask16 m = lanes16(n - j);
          const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sh + j), _mm512_set1_ps(mx)));
          total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
          _mm256_mask_storeu_epi16(ph + j, m, round_bf16x16(e));
        }
        ph[n] = bf16(0.f);
        part_max[task * H + g * G + h] = mx;
        part_sum[task * H + g * G + h] = _mm512_reduce_add_ps(total);
      }
      // 3. sum_j p[h][j] v[j], up to 8 heads at a time and 32 dims per pass over the values: each value is read
      //    once for all the heads of its KV head, two keys per dpbf16
      for (int64_t h0 = 0, hg; h0 < G; h0 += hg) {
        const bf16* ph = probs.data() + h0 * (n + 1);
        float* oh = part_out.data() + (task * H + g * G + h0) * D;
        hg = heads_at_once(G - h0);
        for (int64_t d0 = 0; d0 < D; d0 += 32) {
          switch (hg) {
            case 8: pv_heads<8>(ph, n + 1, n, v_at, d0, oh, D); break;
            case 4: pv_heads<4>(ph, n + 1, n, v_at, d0, oh, D); break;
            case 2: pv_heads<2>(ph, n + 1, n, v_at, d0, oh, D); break;
            default: pv_heads<1>(ph, n + 1, n, v_at, d0, oh, D); break;
          }
        }
      }
    }
    if (first[b + 1] - first[b] == 1)
      for (int64_t h = 0; h < H; ++h) merge(b, h);
  });
  // 4. merge each sequence's chunks: weights exp(max_c - max), out = sum_c w_c out_c / sum_c w_c sum_c. A task
  //    whose sequence is one chunk has written its output itself; a parallel pass merges the others.
  std::vector<int64_t> multi;
  for (int64_t b = 0; b < B; ++b)
    if (first[b + 1] - first[b] > 1) multi.push_back(b);
  run_tasks(static_cast<int64_t>(multi.size()) * H, [&](int64_t t) { merge(multi[t / H], t % H); });
  return out;
}

}  // namespace glm47::cpu
