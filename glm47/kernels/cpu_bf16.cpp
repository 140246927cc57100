// CPU kernels for a bf16 model on AVX512-BF16 (Zen 4/5, Sapphire Rapids and later), float32 accumulation.
//
// linear:            y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for a few rows M. Each task streams a run of W's rows
//                    once and reuses every 4-row block from L1 for all M rows, so a decode step reads W at memory
//                    speed instead of torch's bf16 GEMV speed.
// route:             a MoE layer's router: float32 logits, sigmoid, bias-corrected group-limited top-k, weights.
// routed_experts:    the routed experts of a MoE layer (and its shared expert) in one call: token copies grouped by
//                    expert, gate/up projection + SiLU-and-multiply, down projection, weighted sum in expert order.
//                    A decode step reads each expert's few rows in place (dot products, as `linear`); a prefill
//                    chunk packs the activations by 16 tokens and broadcasts weight pairs (no horizontal sums).
// qk_norm_rope:      per-head RMSNorm of q and k, then partial rotate-half RoPE.
// decode_attention:  one query per sequence over the paged KV cache, read in place (no gather), GQA.
// prefill_attention: a chunk's causal attention over the paged KV cache, flash-attention style.
//
// Numerics follow the torch path in glm47/model (its slow twin): every projection rounds its float32 sum to bf16
// once; silu(gate) and silu(gate) * up are each rounded to bf16; the expert outputs are weighted and summed in
// float32 in expert order and rounded once; attention rounds the probabilities to bf16 for P.V, as SDPA's CPU
// flash kernel does. Built with -ffp-contract=off so that no mul + add becomes an FMA where torch has none.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

using bf16 = at::BFloat16;

// ---------------------------------------------------------------- primitives

inline __m512bh load_bh(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load_bh(const bf16* p, __mmask32 m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }

inline float to_float(bf16 v) { return static_cast<float>(v); }
inline bf16 round_bf16(float v) { return bf16(v); }  // round to nearest even, as torch does

// Sixteen vectors -> one vector of their sixteen horizontal sums: out[i] = sum(v[i]). Halves, then quarters,
// then pairs and single floats are added across vectors, ~3 instructions per sum instead of ~8.
inline __m512 reduce16(const __m512* v) {
  __m512 s[8], u[4], w[2];
  for (int i = 0; i < 8; ++i) {  // 256-bit halves: [a.lo + a.hi | b.lo + b.hi]
    const __m512 a = v[2 * i], b = v[2 * i + 1];
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lanes: one lane per source, 4 sources
    const __m512 a = s[2 * i], b = s[2 * i + 1];
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  for (int i = 0; i < 2; ++i) {  // pairs within a lane: lane l holds sources l and l + 4 (then l + 8, l + 12)
    const __m512 a = u[2 * i], b = u[2 * i + 1];
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // r[4 * l + j] is the sum of source l + 4 * j; put source i at position i.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}

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

// Runs task(0..ntasks-1) on torch's intra-op threads. Thread i owns the i-th contiguous share of the tasks and
// takes them in order, so that each thread reads its weights as one sequential stream (what the prefetching in
// gemm_rows assumes); a thread done with its share takes the next tasks of the others' (so a thread slowed down
// by another process does not hold the step up).
template <typename Task>
void run_tasks(int64_t ntasks, const Task& task) {
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), ntasks);
  if (nt <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < ntasks; ++i) task(i);
    return;
  }
  std::vector<std::atomic<int64_t>> next(nt);
  for (int64_t r = 0; r < nt; ++r) next[r].store(ntasks * r / nt, std::memory_order_relaxed);
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t self = begin; self < end; ++self)
      for (int64_t k = 0; k < nt; ++k) {
        const int64_t r = (self + k) % nt, stop = ntasks * (r + 1) / nt;
        for (int64_t i; (i = next[r].fetch_add(1, std::memory_order_relaxed)) < stop;) task(i);
      }
  });
}

// Rows of W per task: about 64 KB of weights, a multiple of the 4-row block.
inline int64_t rows_per_task(int64_t K) { return std::max<int64_t>(4, (32768 / std::max<int64_t>(K, 1)) & ~3); }

// exp(x) for 16 floats: 2^n * p(r) with n = round(x / ln 2), r = x - n ln 2 in two parts, p a degree-7 Taylor
// polynomial (|r| <= 0.35: truncation ~1e-8 relative). Overflows to inf and underflows to 0 like expf.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(100.f)), _mm512_set1_ps(-110.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// float -> bf16 bits, round to nearest even, NaN -> 0x7FC0: bit for bit c10::BFloat16(float).
inline __m256i round_bf16x16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

inline __m512 bf16x16_to_float(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// bf16(bf16(silu(g)) * u) for 16 gate and up values that are bf16 (held as floats): F.silu(gate) * up.
inline __m256i silu_mul16(__m512 g, __m512 u) {
  const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
  return round_bf16x16(_mm512_mul_ps(bf16x16_to_float(round_bf16x16(s)), u));
}

// h[j] = bf16(bf16(silu(gate[j])) * up[j]) for n values: F.silu(gate) * up on bf16 tensors, vectorised.
inline void silu_mul(const bf16* gate, const bf16* up, bf16* h, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
    _mm256_mask_storeu_epi16(h + j, m, silu_mul16(bf16x16_to_float(_mm256_maskz_loadu_epi16(m, gate + j)),
                                                  bf16x16_to_float(_mm256_maskz_loadu_epi16(m, up + j))));
  }
}

// The _mm512_permutex2var_epi16 index that interleaves two vectors a, b of 32 bf16 into the pairs
// (a[i], b[i]) for i in [first, first + 16): two keys' values side by side, as a dpbf16 operand wants them.
inline __m512i pairs_index(int first) {
  alignas(64) int16_t idx[32];
  for (int i = 0; i < 16; ++i) {
    idx[2 * i] = static_cast<int16_t>(first + i);  // a[first + i]
    idx[2 * i + 1] = static_cast<int16_t>(32 + first + i);  // b[first + i]
  }
  return _mm512_load_si512(idx);
}

void check_bf16_matrix(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16, name, " must be a bf16 CPU tensor, got ",
              t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got ", t.sizes());
}

// ---------------------------------------------------------------- ops

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  bool float_out) {
  check_bf16_matrix(x, "x", 2);
  check_bf16_matrix(weight, "weight", 2);
  TORCH_CHECK(x.size(1) == weight.size(1), "x ", x.sizes(), " and weight ", weight.sizes(), " disagree on K");
  TORCH_CHECK(x.stride(1) == 1 && weight.is_contiguous(), "x rows and weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor b;  // float32 copy: the bias joins the float32 sum before the one rounding, as in addmm
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias ", bias->sizes(), " does not match N=", N);
    b = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({M, N}, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  if (M == 0 || N == 0) return y;
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = weight.data_ptr<bf16>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int64_t ldx = x.stride(0), rows = rows_per_task(K);
  const auto run = [&](auto* yp) {
    run_tasks((N + rows - 1) / rows, [&](int64_t t) {
      const int64_t n0 = t * rows, n1 = std::min(N, n0 + rows);
      gemm_rows(xp, ldx, M, wp, N, K, n0, n1, [&](int64_t m, int64_t n, float v) {
        if (bp) v += bp[n];
        yp[m * N + n] = static_cast<std::remove_pointer_t<decltype(yp)>>(v);
      });
    });
  };
  if (float_out) run(y.data_ptr<float>());
  else run(y.data_ptr<bf16>());
  return y;
}

// ---- many tokens per expert: activations packed by 16 tokens, weights read in place

// out[j * ldo + i] = row_i[j] for 16 rows of 16 32-bit words: three rounds of interleaving (32-bit, 64-bit, then
// 128-bit lanes twice).
inline void transpose16(const uint32_t* const* row, uint32_t* out, int64_t ldo) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(row[i]);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + i * ldo, r[i]);
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

// A grow-only scratch buffer per thread: the packed path's blocks are tens of MB for a long prefill chunk, and a
// fresh allocation each call would page-fault them in every time.
template <typename T>
T* scratch(int slot, size_t n) {
  thread_local std::vector<T> buffers[3];
  if (buffers[slot].size() < n) buffers[slot].resize(n);
  return buffers[slot].data();
}

// One expert's share of a MoE call: its weights, its M rows of x (row m at x + m * H, or at x + tok[m] * H when tok
// is given: packed calls read the tokens in place), where its rows start in the gate/up and hidden buffers, and
// (packed calls) its first group of 16 in the packed buffers.
struct ExpertRows {
  const bf16* w13;  // (2I, H)
  const bf16* w2;  // (H, I)
  int64_t I;
  const bf16* x;
  const int64_t* tok;
  int64_t M, r0, g0;
};

// Average rows per expert from which run_experts packs the activations (vnni_rows) instead of reading them
// in place (gemm_rows): a prefill chunk, not a decode step.
constexpr int64_t PACKED_MIN_ROWS = 32;

// Whether run_experts takes the packed path for these experts (K values must come in pairs).
inline bool packs(const std::vector<ExpertRows>& ex, int64_t H) {
  int64_t rows = 0;
  bool even = H % 2 == 0;
  for (const auto& e : ex) {
    rows += e.M;
    even = even && e.I % 2 == 0;
  }
  return even && !ex.empty() && rows >= PACKED_MIN_ROWS * static_cast<int64_t>(ex.size());
}

// gate/up, SiLU-and-multiply and down projection of several experts' rows, two parallel passes:
//  1. a task is one expert's columns [j0, j1) of I, i.e. gate rows j0..j1 and up rows I + j0..I + j1 of w13; it
//     owns h[rows of the expert, j0:j1] outright (column chunks a multiple of 32: no two tasks share a cache line);
//  2. a task is rows [n0, n1) of H for every expert, in order, so that it owns out[:, n0:n1]; the float32 sums of
//     expert i's down projection go to a task-local block, out[m * ld + n - n0] for its rows m, and then
//     flush(i, out, ld, n0, n1) consumes them (vectors, not one scattered read-modify-write per value); after
//     the last expert, done(n0, n1) is called.
// gu and h are (rows, 2 * max I) and (rows, max I) scratch buffers. With many rows per expert (packed), x is first
// packed by 16 rows, and pass 1 also writes h packed for pass 2.
template <typename Flush, typename Done>
void run_experts(std::vector<ExpertRows>& ex, int64_t H, bf16* gu, bf16* h, int64_t ldgu, int64_t ldh,
                 const Flush& flush, const Done& done) {
  int64_t Imin = ex.empty() ? 1 : ex[0].I, Imax = 0, groups = 0;
  for (auto& e : ex) {
    Imin = std::min(Imin, e.I);
    Imax = std::max(Imax, e.I);
    e.g0 = groups;
    groups += (e.M + 15) / 16;
  }
  const bool packed = packs(ex, H);
  const int64_t xstride = H / 2 * 16, hstride = Imax / 2 * 16;  // words per packed group
  uint32_t *xpk = nullptr, *hpk = nullptr;
  if (packed) {
    xpk = scratch<uint32_t>(0, groups * xstride);
    hpk = scratch<uint32_t>(1, groups * hstride);
    const uint32_t* zero = scratch<uint32_t>(2, H / 2);
    std::fill_n(scratch<uint32_t>(2, H / 2), H / 2, 0u);
    std::vector<std::pair<int64_t, int64_t>> work;  // (expert, group)
    for (size_t i = 0; i < ex.size(); ++i)
      for (int64_t g = 0; g * 16 < ex[i].M; ++g) work.emplace_back(static_cast<int64_t>(i), g);
    run_tasks(static_cast<int64_t>(work.size()), [&](int64_t t) {
      const ExpertRows& e = ex[work[t].first];
      const int64_t g = work[t].second;
      const auto row = [&](int64_t i) { return e.x + (e.tok ? e.tok[g * 16 + i] : g * 16 + i) * H; };
      pack_group(row, std::min<int64_t>(16, e.M - g * 16), H, zero, xpk + (e.g0 + g) * xstride);
    });
  }

  const int64_t cols = std::max<int64_t>(32, rows_per_task(H) / 2 & ~31);  // of I per task
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (expert, j0)
  for (size_t i = 0; i < ex.size(); ++i)
    for (int64_t j0 = 0; j0 < ex[i].I; j0 += cols) tasks.emplace_back(static_cast<int64_t>(i), j0);
  run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
    const ExpertRows& e = ex[tasks[t].first];
    const int64_t I = e.I, j0 = tasks[t].second, j1 = std::min(I, j0 + cols);
    if (packed) {  // per block of 256 tokens: gate and up as (column, token), then h straight into its pairs
      const int64_t ng = (e.M + 15) / 16, ldo = BLOCK_GROUPS * 16 + 16, nc = j1 - j0;  // + 16: no 4 KB stride
      float* gate = scratch<float>(0, 2 * nc * ldo);
      float* up = gate + nc * ldo;
      const __m512i lo = _mm512_setr_epi32(0x100000, 0x110001, 0x120002, 0x130003, 0x140004, 0x150005, 0x160006,
                                           0x170007, 0x180008, 0x190009, 0x1A000A, 0x1B000B, 0x1C000C, 0x1D000D,
                                           0x1E000E, 0x1F000F);  // (a[i], b[i]) of two 16-value halves
      for (int64_t b = 0; b < ng; b += BLOCK_GROUPS) {
        const int64_t bg = std::min(BLOCK_GROUPS, ng - b);
        const uint32_t* xb = xpk + (e.g0 + b) * xstride;
        vnni_rows(xb, xstride, bg, e.w13, H, j0, j1, gate, ldo, e.w13 + (I + j0) * H);
        vnni_rows(xb, xstride, bg, e.w13, H, I + j0, I + j1, up, ldo, b + bg < ng ? e.w13 + j0 * H : nullptr);
        for (int64_t j = 0; j < nc; j += 2)
          for (int64_t g = 0; g < bg; ++g) {
            __m256i hv[2];
            for (int c = 0; c < 2; ++c)
              hv[c] = silu_mul16(bf16x16_to_float(round_bf16x16(_mm512_loadu_ps(gate + (j + c) * ldo + 16 * g))),
                                 bf16x16_to_float(round_bf16x16(_mm512_loadu_ps(up + (j + c) * ldo + 16 * g))));
            const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(hv[0]), hv[1], 1);
            // pairs (h_j, h_j+1) of the group's 16 tokens; tokens past M multiply zeros: h = 0 there
            _mm512_storeu_si512(hpk + (e.g0 + b + g) * hstride + (j0 + j) / 2 * 16, _mm512_permutexvar_epi16(lo, both));
          }
      }
      return;
    }
    bf16* gue = gu + e.r0 * ldgu;
    const auto st = [&](int64_t m, int64_t n, float v) { gue[m * ldgu + n] = round_bf16(v); };
    gemm_rows(e.x, H, e.M, e.w13, 2 * I, H, j0, j1, st, e.w13 + (I + j0) * H);
    gemm_rows(e.x, H, e.M, e.w13, 2 * I, H, I + j0, I + j1, st);
    for (int64_t m = 0; m < e.M; ++m)
      silu_mul(gue + m * ldgu + j0, gue + m * ldgu + I + j0, h + (e.r0 + m) * ldh + j0, j1 - j0);
  });
  const int64_t rows = std::min<int64_t>(H, rows_per_task(2 * Imin));  // ~32 KB of each expert's w2 per task
  int64_t Mmax = 0;
  for (const auto& e : ex) Mmax = std::max(Mmax, e.M);
  run_tasks((H + rows - 1) / rows, [&](int64_t t) {
    const int64_t n0 = t * rows, n1 = std::min(H, n0 + rows), ld = (n1 - n0 + 15) / 16 * 16;
    float* op = scratch<float>(1, (Mmax + 15) / 16 * 16 * ld);
    const auto st = [&](int64_t m, int64_t n, float v) { op[m * ld + n - n0] = v; };
    for (size_t i = 0; i < ex.size(); ++i) {
      const ExpertRows& e = ex[i];
      if (packed) {  // per block of 256 tokens: (column, token), then 16 x 16 transposes to (token, column)
        const int64_t ng = (e.M + 15) / 16, ldt = BLOCK_GROUPS * 16 + 16;  // + 16: rows not 4 KB apart (L1 sets)
        float* cols = scratch<float>(2, ld * ldt);
        for (int64_t b = 0; b < ng; b += BLOCK_GROUPS) {
          const int64_t bg = std::min(BLOCK_GROUPS, ng - b);
          const bf16* then = b + bg < ng ? e.w2 + n0 * e.I : i + 1 < ex.size() ? ex[i + 1].w2 + n0 * ex[i + 1].I
                                                                                : nullptr;
          vnni_rows(hpk + (e.g0 + b) * hstride, hstride, bg, e.w2, e.I, n0, n1, cols, ldt, then);
          for (int64_t c = 0; c < n1 - n0; c += 16)
            for (int64_t g = 0; g < bg; ++g) {
              const uint32_t* src[16];
              for (int r = 0; r < 16; ++r)  // rows past n1 - n0 repeat a real one; their results are not read
                src[r] = reinterpret_cast<const uint32_t*>(cols + std::min<int64_t>(c + r, n1 - n0 - 1) * ldt + 16 * g);
              transpose16(src, reinterpret_cast<uint32_t*>(op + 16 * (b + g) * ld + c), ld);
            }
        }
      } else {
        const bf16* then = i + 1 < ex.size() ? ex[i + 1].w2 + n0 * ex[i + 1].I : nullptr;  // the next expert's rows
        gemm_rows(h + e.r0 * ldh, ldh, e.M, e.w2, H, e.I, n0, n1, st, then);
      }
      flush(i, static_cast<const float*>(op), ld, n0, n1);
    }
    done(n0, n1);
  });
}

at::Tensor routed_experts(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& weights,
                          const at::Tensor& ids, const c10::optional<at::Tensor>& shared_w13,
                          const c10::optional<at::Tensor>& shared_w2) {
  check_bf16_matrix(x, "x", 2);
  check_bf16_matrix(w13, "w13", 3);
  check_bf16_matrix(w2, "w2", 3);
  TORCH_CHECK(x.is_contiguous() && w13.is_contiguous() && w2.is_contiguous(), "x, w13 and w2 must be contiguous");
  const int64_t T = x.size(0), H = x.size(1), E = w13.size(0), I = w13.size(1) / 2;
  TORCH_CHECK(w13.size(1) == 2 * I && w13.size(2) == H, "w13 ", w13.sizes(), " is not (E, 2I, H) with H=", H);
  TORCH_CHECK(w2.size(0) == E && w2.size(1) == H && w2.size(2) == I, "w2 ", w2.sizes(), " is not (E, H, I)");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == T && weights.sizes() == ids.sizes(),
              "ids ", ids.sizes(), " and weights ", weights.sizes(), " must both be (T, K) with T=", T);
  const bool shared = shared_w13.has_value() && shared_w13->defined();
  int64_t Is = 0;
  if (shared) {
    TORCH_CHECK(shared_w2.has_value() && shared_w2->defined(), "shared_w13 given without shared_w2");
    check_bf16_matrix(*shared_w13, "shared_w13", 2);
    check_bf16_matrix(*shared_w2, "shared_w2", 2);
    Is = shared_w13->size(0) / 2;
    TORCH_CHECK(shared_w13->is_contiguous() && shared_w2->is_contiguous() && shared_w13->size(1) == H &&
                shared_w2->size(0) == H && shared_w2->size(1) == Is && shared_w13->size(0) == 2 * Is,
                "shared expert ", shared_w13->sizes(), " / ", shared_w2->sizes(), " is not (2I, H) / (H, I) with H=", H);
  }
  const at::Tensor id = ids.to(at::kLong).contiguous(), wt = weights.to(at::kFloat).contiguous();
  const int64_t K = ids.size(1), C = T * K;  // C token copies
  const int64_t* idp = id.data_ptr<int64_t>();
  const float* wtp = wt.data_ptr<float>();

  // Copies grouped by expert, in token order within an expert (a stable sort by expert id).
  std::vector<int64_t> start(E + 1, 0), src(C);
  for (int64_t c = 0; c < C; ++c) {
    TORCH_CHECK(idp[c] >= 0 && idp[c] < E, "expert id ", idp[c], " out of range [0, ", E, ")");
    ++start[idp[c] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t c = 0; c < C; ++c) src[fill[idp[c]]++] = c;  // src[row] = flat (token, k) index

  const int64_t Imax = std::max(I, Is), rows_total = C + (shared ? T : 0);  // the shared expert's rows come last
  std::vector<int64_t> token(C);  // token of each grouped row
  std::vector<float> weight(C);  // its routing weight
  for (int64_t r = 0; r < C; ++r) {
    token[r] = src[r] / K;
    weight[r] = wtp[src[r]];
  }
  const bf16* xp = x.data_ptr<bf16>();
  std::vector<ExpertRows> ex;
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e])
      ex.push_back({w13.data_ptr<bf16>() + e * 2 * I * H, w2.data_ptr<bf16>() + e * H * I, I, xp,
                    token.data() + start[e], start[e + 1] - start[e], start[e], 0});
  const size_t routed = ex.size();
  if (shared) ex.push_back({shared_w13->data_ptr<bf16>(), shared_w2->data_ptr<bf16>(), Is, xp, nullptr, T, C, 0});
  const bool packed = packs(ex, H);
  at::Tensor xs = at::empty({packed ? 0 : C, H}, x.options());  // unpacked: x of each copy, grouped
  at::Tensor gu = at::empty({packed ? 0 : rows_total, 2 * Imax}, x.options());  // bf16 gate | up, as F.linear
  at::Tensor h = at::empty({packed ? 0 : rows_total, Imax}, x.options());  // bf16(silu(gate) * up)
  at::Tensor acc = at::zeros({T, H}, x.options().dtype(at::kFloat));
  at::Tensor ys = at::empty({shared ? T : 0, H}, x.options());  // the shared expert's bf16 output
  at::Tensor y = at::empty({T, H}, x.options());
  bf16 *xsp = xs.data_ptr<bf16>(), *ysp = ys.data_ptr<bf16>(), *yp = y.data_ptr<bf16>();
  float* accp = acc.data_ptr<float>();
  if (!packed) {  // gemm_rows reads each expert's rows contiguous
    for (int64_t r = 0; r < C; ++r) std::copy_n(xp + token[r] * H, H, xsp + r * H);
    for (size_t i = 0; i < routed; ++i) {
      ex[i].x = xsp + ex[i].r0 * H;
      ex[i].tok = nullptr;
    }
  }

  // Routed rows: weighted, summed in float32 in expert order (as the torch path's index_add_) and rounded once;
  // the shared expert's output is rounded on its own, then added in bf16 (as `y + shared_experts(x)`).
  run_experts(ex, H, gu.data_ptr<bf16>(), h.data_ptr<bf16>(), 2 * Imax, Imax,
              [&](size_t i, const float* out, int64_t ld, int64_t n0, int64_t n1) {
                const ExpertRows& e = ex[i];
                for (int64_t m = 0; m < e.M; ++m)
                  for (int64_t n = n0; n < n1; n += 16) {
                    const __mmask16 k = n1 - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n1 - n)) - 1);
                    const __m256i v = round_bf16x16(_mm512_maskz_loadu_ps(k, out + m * ld + n - n0));
                    if (i < routed) {  // acc[token] += bf16(v) * weight, in expert order
                      float* a = accp + token[e.r0 + m] * H + n;
                      const __m512 w = _mm512_set1_ps(weight[e.r0 + m]);
                      _mm512_mask_storeu_ps(a, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, a),
                                                                _mm512_mul_ps(bf16x16_to_float(v), w)));
                    } else {
                      _mm256_mask_storeu_epi16(ysp + m * H + n, k, v);
                    }
                  }
              },
              [&](int64_t n0, int64_t n1) {
                for (int64_t tok = 0; tok < T; ++tok)
                  for (int64_t n = n0; n < n1; n += 16) {
                    const __mmask16 k = n1 - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n1 - n)) - 1);
                    __m256i r = round_bf16x16(_mm512_maskz_loadu_ps(k, accp + tok * H + n));
                    if (shared)
                      r = round_bf16x16(_mm512_add_ps(bf16x16_to_float(r), bf16x16_to_float(
                                                          _mm256_maskz_loadu_epi16(k, ysp + tok * H + n))));
                    _mm256_mask_storeu_epi16(yp + tok * H + n, k, r);
                  }
              });
  return y;
}

// The router of a MoE layer: logits = x W^T in float32 (W (E, H) float32), scores = sigmoid(logits), the top_k
// experts by scores + bias (ties to the lower id) among the topk_group best of n_group groups (a group scores the
// sum of its two best biased scores), their unbiased scores as weights, normalised to sum 1 (norm) and times
// scale. Returns weights (T, top_k) float32 and ids (T, top_k) int64, in descending order of the biased score, as
// select_experts (its twin) returns them.
std::vector<at::Tensor> route(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, int64_t top_k,
                              int64_t n_group, int64_t topk_group, bool norm, double scale) {
  check_bf16_matrix(x, "x", 2);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous() && w.size(1) == x.size(1),
              "router weight ", w.sizes(), " must be contiguous float32 (E, H) with H=", x.size(1));
  const int64_t T = x.size(0), H = x.size(1), E = w.size(0);
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == E && top_k >= 1 && top_k <= E,
              "bias ", bias.sizes(), " / top_k ", top_k, " do not fit ", E, " experts");
  TORCH_CHECK(x.stride(1) == 1, "x rows must be contiguous");
  TORCH_CHECK(n_group >= 1 && E % n_group == 0 && E / n_group >= (n_group > 1 ? 2 : 1) && topk_group >= 1 &&
              topk_group <= n_group, "n_group ", n_group, " / topk_group ", topk_group, " do not fit ", E, " experts");
  const at::Tensor b = bias.contiguous();
  at::Tensor weights = at::empty({T, top_k}, x.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({T, top_k}, x.options().dtype(at::kLong));
  const bf16* xp = x.data_ptr<bf16>();
  const float *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* op = weights.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  run_tasks(T, [&](int64_t t) {
    std::vector<float> xf(H), score(E), choice(E);
    const bf16* xr = xp + t * x.stride(0);
    for (int64_t k = 0; k < H; ++k) xf[k] = to_float(xr[k]);
    for (int64_t e = 0; e < E; ++e) {
      const float* we = wp + e * H;
      __m512 acc = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= H; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(xf.data() + k), _mm512_loadu_ps(we + k), acc);
      float logit = _mm512_reduce_add_ps(acc);
      for (; k < H; ++k) logit += xf[k] * we[k];
      score[e] = 1.f / (1.f + std::exp(-logit));
      choice[e] = score[e] + bp[e];
    }
    const auto better = [](const std::vector<float>& v) {
      return [&v](int64_t a, int64_t c) { return v[a] > v[c] || (v[a] == v[c] && a < c); };
    };
    if (n_group > 1) {  // experts outside the best topk_group groups drop out
      const int64_t per = E / n_group;
      std::vector<float> group(n_group);
      std::vector<int64_t> groups(n_group);
      for (int64_t g = 0; g < n_group; ++g) {
        float a = -INFINITY, c = -INFINITY;  // the two best of the group
        for (int64_t e = g * per; e < (g + 1) * per; ++e) {
          if (choice[e] > a) { c = a; a = choice[e]; }
          else if (choice[e] > c) c = choice[e];
        }
        group[g] = a + c;
        groups[g] = g;
      }
      std::partial_sort(groups.begin(), groups.begin() + topk_group, groups.end(), better(group));
      std::vector<char> keep(n_group, 0);
      for (int64_t i = 0; i < topk_group; ++i) keep[groups[i]] = 1;
      for (int64_t e = 0; e < E; ++e)
        if (!keep[e / per]) choice[e] = -INFINITY;
    }
    std::vector<int64_t> order(E);
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                      better(choice));
    float sum = 0.f;
    for (int64_t k = 0; k < top_k; ++k) sum += score[order[k]];
    for (int64_t k = 0; k < top_k; ++k) {
      ip[t * top_k + k] = order[k];
      const float v = norm ? score[order[k]] / (sum + 1e-20f) : score[order[k]];
      op[t * top_k + k] = v * static_cast<float>(scale);
    }
  });
  return {weights, ids};
}

// ---- decode attention

// Where key / value s of one sequence and KV head g lives in a paged cache (num_blocks, bs, Hkv, D): block
// table[s / bs], slot s % bs. A shift and a mask when bs is a power of two (the engine's 16): a division per key
// would cost more than the key's dot products.
struct PagedRows {
  const int64_t* table;
  int64_t bs, Hkv, D, g;
  int shift;  // log2(bs), or -1

  PagedRows(const int64_t* table, int64_t bs, int64_t Hkv, int64_t D, int64_t g)
      : table(table), bs(bs), Hkv(Hkv), D(D), g(g), shift((bs & (bs - 1)) == 0 ? __builtin_ctzll(bs) : -1) {}

  const bf16* operator()(const bf16* cache, int64_t s) const {
    const int64_t slot = shift >= 0 ? (table[s >> shift] << shift) + (s & (bs - 1)) : table[s / bs] * bs + s % bs;
    return cache + (slot * Hkv + g) * D;
  }
};

// q (rows, H, D) and the paged caches (num_blocks, block_size, Hkv, D): bf16, contiguous, D a multiple of 32, and
// H a multiple of Hkv.
void check_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check_bf16_matrix(q, "q", 3);
  check_bf16_matrix(k_cache, "k_cache", 4);
  check_bf16_matrix(v_cache, "v_cache", 4);
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "q and the caches must be contiguous");
  const int64_t H = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == D && D % 32 == 0 && H % Hkv == 0,
              "q ", q.sizes(), " and caches ", k_cache.sizes(), " do not fit (head_dim must be a multiple of 32)");
}

// Keys ahead whose rows attention prefetches: paged rows are short runs (D values of one KV head), which the
// hardware prefetchers do not follow far enough to keep the memory busy.
constexpr int64_t KEYS_AHEAD = 16;

inline void prefetch_row(const bf16* row, int64_t D) {
  for (int64_t off = 0; off < D * 2; off += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + off, _MM_HINT_T0);
}

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
        const float w = first[b + 1] - first[b] == 1 ? 1.f : std::exp(part_max[c * H + h] - mx);
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
    std::vector<float> scores(G * n), pv(8 * D);
    std::vector<bf16> probs(G * (n + 1));
    for (int64_t g = 0; g < Hkv; ++g) {
      const PagedRows row(tp + b * W, bs, Hkv, D, g);  // key / value s of this sequence and KV head
      const auto k_at = [&](int64_t j) { return row(kp, s0 + j); };
      const auto v_at = [&](int64_t j) { return row(vp, s0 + j); };
      // 1. scores, G heads at a time in chunks of 8, 4, 2, 1
      for (int64_t h0 = 0; h0 < G;) {
        const bf16* qh = qp + (b * H + g * G + h0) * D;
        float* sh = scores.data() + h0 * n;
        const int64_t left = G - h0;
        if (left >= 8) { attention_scores<8>(qh, D, n, k_at, sc, sh, n); h0 += 8; }
        else if (left >= 4) { attention_scores<4>(qh, D, n, k_at, sc, sh, n); h0 += 4; }
        else if (left >= 2) { attention_scores<2>(qh, D, n, k_at, sc, sh, n); h0 += 2; }
        else { attention_scores<1>(qh, D, n, k_at, sc, sh, n); h0 += 1; }
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
          const __mmask16 m = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
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
      for (int64_t h0 = 0; h0 < G;) {
        const bf16* ph = probs.data() + h0 * (n + 1);
        float* oh = part_out.data() + (task * H + g * G + h0) * D;
        const int64_t left = G - h0, hg = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        for (int64_t d0 = 0; d0 < D; d0 += 32) {
          switch (hg) {
            case 8: pv_heads<8>(ph, n + 1, n, v_at, d0, oh, D); break;
            case 4: pv_heads<4>(ph, n + 1, n, v_at, d0, oh, D); break;
            case 2: pv_heads<2>(ph, n + 1, n, v_at, d0, oh, D); break;
            default: pv_heads<1>(ph, n + 1, n, v_at, d0, oh, D); break;
          }
        }
        h0 += hg;
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

// ---- RMSNorm, alone or after the residual add

// out = bf16(w * bf16(x * r)), r = 1 / sqrt(mean(x^2) + eps), for one row of D bf16 values: RMSNorm.forward's
// rounding (normalised in float32, rounded, times the bf16 weight, rounded).
inline void rms_norm_row(const bf16* x, const bf16* w, float eps, int64_t D, bf16* out) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 k = D - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1);
    const __m512 v = bf16x16_to_float(_mm256_maskz_loadu_epi16(k, x + d));
    ss = _mm512_add_ps(ss, _mm512_mul_ps(v, v));
  }
  const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(D) + eps));
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 k = D - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1);
    const __m512 v = bf16x16_to_float(_mm256_maskz_loadu_epi16(k, x + d));
    const __m512 n = bf16x16_to_float(round_bf16x16(_mm512_mul_ps(v, r)));
    const __m512 wv = bf16x16_to_float(_mm256_maskz_loadu_epi16(k, w + d));
    _mm256_mask_storeu_epi16(out + d, k, round_bf16x16(_mm512_mul_ps(wv, n)));
  }
}

// RMSNorm of each row of x (rows, D) bf16 with the bf16 weight w. With `add` given (the same shape), the rows
// are x + add first (rounded to bf16, as a bf16 tensor add), and that sum is returned too: (sum, norm(sum)).
std::vector<at::Tensor> rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& add, const at::Tensor& w,
                                 double eps) {
  check_bf16_matrix(x, "x", 2);
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(x.is_contiguous() && w.scalar_type() == at::kBFloat16 && w.numel() == D && w.is_contiguous(),
              "x ", x.sizes(), " must be contiguous and the weight ", w.sizes(), " bf16 of ", D, " values");
  const bool adding = add.has_value() && add->defined();
  TORCH_CHECK(!adding || (add->sizes() == x.sizes() && add->scalar_type() == at::kBFloat16 && add->is_contiguous()),
              "the residual ", adding ? add->sizes() : x.sizes(), " must be a contiguous bf16 tensor like x ", x.sizes());
  at::Tensor sum = adding ? at::empty_like(x) : x, out = at::empty_like(x);
  const bf16 *xp = x.data_ptr<bf16>(), *ap = adding ? add->data_ptr<bf16>() : nullptr, *wp = w.data_ptr<bf16>();
  bf16 *sp = sum.data_ptr<bf16>(), *op = out.data_ptr<bf16>();
  const int64_t chunk = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));  // rows per task
  run_tasks((T + chunk - 1) / chunk, [&](int64_t task) {
    for (int64_t t = task * chunk; t < std::min(T, (task + 1) * chunk); ++t) {
      if (adding)
        for (int64_t d = 0; d < D; d += 16) {
          const __mmask16 k = D - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1);
          const __m512 a = bf16x16_to_float(_mm256_maskz_loadu_epi16(k, xp + t * D + d));
          const __m512 b = bf16x16_to_float(_mm256_maskz_loadu_epi16(k, ap + t * D + d));
          _mm256_mask_storeu_epi16(sp + t * D + d, k, round_bf16x16(_mm512_add_ps(a, b)));
        }
      rms_norm_row(sp + t * D, wp, static_cast<float>(eps), D, op + t * D);
    }
  });
  return {sum, out};
}

// ---- attention prologue: per-head RMSNorm of q and k, then partial NeoX RoPE

inline float bf16_round_float(float v) {  // float -> nearest-even bf16 -> float, NaN kept (bit ops: vectorisable)
  uint32_t b;
  std::memcpy(&b, &v, 4);
  if ((b & 0x7F800000u) == 0x7F800000u && (b & 0x007FFFFFu)) return v;
  b = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
  float r;
  std::memcpy(&r, &b, 4);
  return r;
}

// One head of D values in place (as floats holding bf16 values): RMSNorm with weight w (when given), as
// RMSNorm.forward rounds it (normalised in float32, rounded, times the bf16 weight, rounded), then rotate-half
// RoPE on the first `rot` dims, as apply_rope rounds it: bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)).
inline void norm_rope_head(float* h, int64_t D, const float* w, float eps, const float* cos, const float* sin,
                           int64_t rot, float* tmp) {
  if (w) {
    float ss = 0.f;
    for (int64_t i = 0; i < D; ++i) ss += h[i] * h[i];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t i = 0; i < D; ++i) h[i] = bf16_round_float(w[i] * bf16_round_float(h[i] * r));
  }
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; ++i) tmp[i] = -h[i + half];
  for (int64_t i = half; i < rot; ++i) tmp[i] = h[i - half];
  for (int64_t i = 0; i < rot; ++i)
    h[i] = bf16_round_float(bf16_round_float(h[i] * cos[i]) + bf16_round_float(tmp[i] * sin[i]));
}

// qkv (T, >= (H + 2 Hkv) D) bf16, rows possibly strided: the fused projection's output. Returns q (T, H, D) and
// k (T, Hkv, D), normed (q_w / k_w given) and rotated with cos / sin (T, rot) bf16; v stays where it is.
std::vector<at::Tensor> qk_norm_rope(const at::Tensor& qkv, int64_t H, int64_t Hkv, int64_t D,
                                     const c10::optional<at::Tensor>& q_w, const c10::optional<at::Tensor>& k_w,
                                     double eps, const at::Tensor& cos, const at::Tensor& sin) {
  check_bf16_matrix(qkv, "qkv", 2);
  check_bf16_matrix(cos, "cos", 2);
  check_bf16_matrix(sin, "sin", 2);
  const int64_t T = qkv.size(0), rot = cos.size(1);
  TORCH_CHECK(qkv.stride(1) == 1 && qkv.size(1) >= (H + 2 * Hkv) * D, "qkv ", qkv.sizes(), " is not (T, (H + 2Hkv) D)");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(0) == T && rot <= D && rot % 2 == 0 && cos.is_contiguous() &&
              sin.is_contiguous(), "cos/sin ", cos.sizes(), " are not (T, rot) for T=", T, " and head_dim ", D);
  const bool norm = q_w.has_value() && q_w->defined();
  at::Tensor qw, kw;
  if (norm) {
    TORCH_CHECK(k_w.has_value() && k_w->defined() && q_w->numel() == D && k_w->numel() == D,
                "q_norm and k_norm weights must both have head_dim values");
    qw = q_w->to(at::kFloat).contiguous();
    kw = k_w->to(at::kFloat).contiguous();
  }
  at::Tensor q = at::empty({T, H, D}, qkv.options()), k = at::empty({T, Hkv, D}, qkv.options());
  const bf16 *src = qkv.data_ptr<bf16>(), *cp = cos.data_ptr<bf16>(), *sp = sin.data_ptr<bf16>();
  bf16 *qp = q.data_ptr<bf16>(), *kp = k.data_ptr<bf16>();
  const int64_t ld = qkv.stride(0), chunk = std::max<int64_t>(1, 4096 / ((H + Hkv) * D));
  run_tasks((T + chunk - 1) / chunk, [&](int64_t task) {
    std::vector<float> h(D), tmp(D), c(rot), s(rot);
    for (int64_t t = task * chunk; t < std::min(T, (task + 1) * chunk); ++t) {
      for (int64_t i = 0; i < rot; ++i) {
        c[i] = to_float(cp[t * rot + i]);
        s[i] = to_float(sp[t * rot + i]);
      }
      for (int64_t j = 0; j < H + Hkv; ++j) {
        const bf16* x = src + t * ld + j * D;
        for (int64_t i = 0; i < D; ++i) h[i] = to_float(x[i]);
        const float* w = !norm ? nullptr : j < H ? qw.data_ptr<float>() : kw.data_ptr<float>();
        norm_rope_head(h.data(), D, w, static_cast<float>(eps), c.data(), s.data(), rot, tmp.data());
        bf16* dst = j < H ? qp + (t * H + j) * D : kp + (t * Hkv + j - H) * D;
        for (int64_t i = 0; i < D; ++i) dst[i] = bf16(h[i]);  // exact: h holds bf16 values
      }
    }
  });
  return {q, k};
}

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
          valid[j / 16] = sees - j >= 16 ? (__mmask16)0xFFFF
                          : sees - j <= 0 ? (__mmask16)0 : (__mmask16)((1u << (sees - j)) - 1);
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

bool cpu_supported() { return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw"); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x @ weight.T (+ bias) for a few bf16 rows", py::arg("x"), py::arg("weight"),
        py::arg("bias") = py::none(), py::arg("float_out") = false);
  m.def("routed_experts", &routed_experts, "weighted sum of each token's routed experts, plus the shared expert (bf16)",
        py::arg("x"), py::arg("w13"), py::arg("w2"), py::arg("weights"), py::arg("ids"),
        py::arg("shared_w13") = py::none(), py::arg("shared_w2") = py::none());
  m.def("route", &route, "sigmoid router: bias-corrected, group-limited top-k");
  m.def("decode_attention", &decode_attention, "one query per sequence over paged bf16 K/V (GQA)");
  m.def("prefill_attention", &prefill_attention, "causal attention of a chunk of queries over paged bf16 K/V",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"), py::arg("ctx"),
        py::arg("scale"));
  m.def("rms_norm", &rms_norm, "RMSNorm of bf16 rows, optionally after adding a residual", py::arg("x"),
        py::arg("add"), py::arg("weight"), py::arg("eps"));
  m.def("qk_norm_rope", &qk_norm_rope, "per-head RMSNorm of q and k, then partial NeoX RoPE (bf16)");
  m.def("cpu_supported", &cpu_supported, "whether this CPU runs AVX512-BF16");
}
