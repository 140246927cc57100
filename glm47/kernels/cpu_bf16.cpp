// CPU decode kernels for bf16 weights on AVX512-BF16 (Zen 4/5, Sapphire Rapids and later), float32 accumulation.
//
// linear:          y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for a few rows M. Each task streams a run of W's rows
//                  once and reuses every 4-row block from L1 for all M rows, so a decode step reads W at memory
//                  speed instead of torch's ~10-17 GB/s bf16 GEMV.
// routed_experts:  the routed-expert part of a MoE layer in one call: group token copies by expert, gate/up
//                  projection + SiLU-and-multiply, down projection, weighted sum over each token's K experts.
//
// Numerics follow the torch path in glm47/model (its slow twin): every projection rounds its float32 sum to bf16
// once; silu(gate) and silu(gate) * up are each rounded to bf16; the expert outputs are weighted and summed in
// float32 in expert order and rounded once. Built with -ffp-contract=off so that no mul + add becomes an FMA there.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
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

// out[4 * m + j] = dot(x[m], W row j) for m < MT rows of x and the 4 rows of W given by pointer (all K long).
// With pf, also prefetches the 4 rows at pf (the next block) into L1, so that memory works during the compute.
template <int MT>
inline void dot_tile(const bf16* x, int64_t ldx, const bf16* const* w, int64_t K, float* out, const bf16* const* pf) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512bh w0 = load_bh(w[0] + k), w1 = load_bh(w[1] + k), w2 = load_bh(w[2] + k), w3 = load_bh(w[3] + k);
    if (pf)
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(pf[j] + k), _MM_HINT_T0);
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

// For W rows [n0, n1) of W (N rows of K, row stride ldw) and all M rows of x: calls store(m, n, float sum).
// W is read in blocks of 4 rows; each block serves every row of x while it sits in L1.
template <typename Store>
inline void gemm_rows(const bf16* x, int64_t ldx, int64_t M, const bf16* W, int64_t ldw, int64_t N, int64_t K,
                      int64_t n0, int64_t n1, const Store& store) {
  float out[16];
  const bf16 *w[4], *next[4];
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t nn = std::min<int64_t>(4, n1 - n);
    for (int j = 0; j < 4; ++j) {
      w[j] = W + std::min(n + j, N - 1) * ldw;  // a short block repeats its last row
      next[j] = W + std::min(n + 4 + j, N - 1) * ldw;
    }
    for (int64_t m = 0; m < M; m += 4) {
      const int64_t mt = std::min<int64_t>(4, M - m);
      const bf16* xm = x + m * ldx;
      const bf16* const* pf = m == 0 ? next : nullptr;
      switch (mt) {
        case 1: dot_tile<1>(xm, ldx, w, K, out, pf); break;
        case 2: dot_tile<2>(xm, ldx, w, K, out, pf); break;
        case 3: dot_tile<3>(xm, ldx, w, K, out, pf); break;
        default: dot_tile<4>(xm, ldx, w, K, out, pf); break;
      }
      for (int64_t i = 0; i < mt; ++i)
        for (int64_t j = 0; j < nn; ++j) store(m + i, n + j, out[4 * i + j]);
    }
  }
}

// Runs task(0..ntasks-1) on torch's intra-op threads, each thread taking the next task when it is done
// (dynamic, so a thread slowed down by another process does not hold the others up).
template <typename Task>
void run_tasks(int64_t ntasks, const Task& task) {
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), ntasks);
  if (nt <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < ntasks; ++i) task(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < ntasks;) task(i);
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

inline __m512 bf16x16_to_float(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// h[j] = bf16(bf16(silu(gate[j])) * up[j]) for n values: F.silu(gate) * up on bf16 tensors, vectorised.
inline void silu_mul(const bf16* gate, const bf16* up, bf16* h, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
    const __m512 g = bf16x16_to_float(_mm256_maskz_loadu_epi16(m, gate + j));
    const __m512 u = bf16x16_to_float(_mm256_maskz_loadu_epi16(m, up + j));
    const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    const __m512 prod = _mm512_mul_ps(bf16x16_to_float(round_bf16x16(s)), u);
    _mm256_mask_storeu_epi16(h + j, m, round_bf16x16(prod));
  }
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
      gemm_rows(xp, ldx, M, wp, K, N, K, n0, n1, [&](int64_t m, int64_t n, float v) {
        if (bp) v += bp[n];
        yp[m * N + n] = static_cast<std::remove_pointer_t<decltype(yp)>>(v);
      });
    });
  };
  if (float_out) run(y.data_ptr<float>());
  else run(y.data_ptr<bf16>());
  return y;
}

at::Tensor routed_experts(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& weights,
                          const at::Tensor& ids) {
  check_bf16_matrix(x, "x", 2);
  check_bf16_matrix(w13, "w13", 3);
  check_bf16_matrix(w2, "w2", 3);
  TORCH_CHECK(x.is_contiguous() && w13.is_contiguous() && w2.is_contiguous(), "x, w13 and w2 must be contiguous");
  const int64_t T = x.size(0), H = x.size(1), E = w13.size(0), I = w13.size(1) / 2;
  TORCH_CHECK(w13.size(1) == 2 * I && w13.size(2) == H, "w13 ", w13.sizes(), " is not (E, 2I, H) with H=", H);
  TORCH_CHECK(w2.size(0) == E && w2.size(1) == H && w2.size(2) == I, "w2 ", w2.sizes(), " is not (E, H, I)");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == T && weights.sizes() == ids.sizes(),
              "ids ", ids.sizes(), " and weights ", weights.sizes(), " must both be (T, K) with T=", T);
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
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e]) active.push_back(e);

  at::Tensor xs = at::empty({C, H}, x.options());  // x of each copy, grouped
  at::Tensor gu = at::empty({C, 2 * I}, x.options());  // bf16 gate | up, as F.linear returns them
  at::Tensor h = at::empty({C, I}, x.options());  // bf16(silu(gate) * up)
  at::Tensor acc = at::zeros({T, H}, x.options().dtype(at::kFloat));
  at::Tensor y = at::empty({T, H}, x.options());
  const bf16* xp = x.data_ptr<bf16>();
  bf16 *xsp = xs.data_ptr<bf16>(), *gup = gu.data_ptr<bf16>(), *hp = h.data_ptr<bf16>(), *yp = y.data_ptr<bf16>();
  float* accp = acc.data_ptr<float>();
  const bf16 *w13p = w13.data_ptr<bf16>(), *w2p = w2.data_ptr<bf16>();
  for (int64_t r = 0; r < C; ++r) std::copy_n(xp + (src[r] / K) * H, H, xsp + r * H);

  // 1. gate/up and SiLU-and-multiply: a task is one expert's columns [j0, j1) of I, i.e. gate rows j0..j1 and
  //    up rows I + j0..I + j1 of w13[e]; it owns h[rows of e, j0:j1] outright.
  // Columns per task a multiple of 32, so that no two tasks write into the same cache line of gu or h.
  const int64_t cols = std::min<int64_t>(I, std::max<int64_t>(32, rows_per_task(H) / 2 & ~31));
  const int64_t col_tasks = (I + cols - 1) / cols;
  run_tasks(static_cast<int64_t>(active.size()) * col_tasks, [&](int64_t t) {
    const int64_t e = active[t / col_tasks], j0 = (t % col_tasks) * cols, j1 = std::min(I, j0 + cols);
    const int64_t r0 = start[e], M = start[e + 1] - r0;
    const bf16* xe = xsp + r0 * H;
    bf16* gue = gup + r0 * 2 * I;
    const auto store = [&](int64_t m, int64_t n, float v) { gue[m * 2 * I + n] = round_bf16(v); };
    const bf16* We = w13p + e * 2 * I * H;
    gemm_rows(xe, H, M, We, H, 2 * I, H, j0, j1, store);
    gemm_rows(xe, H, M, We, H, 2 * I, H, I + j0, I + j1, store);
    for (int64_t m = 0; m < M; ++m) silu_mul(gue + m * 2 * I + j0, gue + m * 2 * I + I + j0, hp + (r0 + m) * I + j0, j1 - j0);
  });

  // 2. down projection and the weighted sum: a task is rows [n0, n1) of H for every expert, in expert order, so it
  //    owns y[:, n0:n1] and adds each token's copies in the same order as the torch path's index_add_.
  const int64_t rows = std::min<int64_t>(H, rows_per_task(2 * I));  // ~32 KB of each expert's w2 per task
  run_tasks((H + rows - 1) / rows, [&](int64_t t) {
    const int64_t n0 = t * rows, n1 = std::min(H, n0 + rows);
    for (const int64_t e : active) {
      const int64_t r0 = start[e], M = start[e + 1] - r0;
      gemm_rows(hp + r0 * I, I, M, w2p + e * H * I, I, H, I, n0, n1, [&](int64_t m, int64_t n, float v) {
        const int64_t c = src[r0 + m];
        accp[(c / K) * H + n] += to_float(round_bf16(v)) * wtp[c];
      });
    }
    for (int64_t tok = 0; tok < T; ++tok)
      for (int64_t n = n0; n < n1; ++n) yp[tok * H + n] = round_bf16(accp[tok * H + n]);
  });
  return y;
}

bool cpu_supported() { return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw"); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x @ weight.T (+ bias) for a few bf16 rows", py::arg("x"), py::arg("weight"),
        py::arg("bias") = py::none(), py::arg("float_out") = false);
  m.def("routed_experts", &routed_experts, "weighted sum of each token's routed experts (bf16)");
  m.def("cpu_supported", &cpu_supported, "whether this CPU runs AVX512-BF16");
}
