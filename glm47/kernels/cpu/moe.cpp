// A MoE layer's router and its routed (+ shared) experts in one call each.

#include "ops.h"
#include "common.h"
#include "gemm.h"

namespace glm47::cpu {

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

// gate/up, SiLU-and-multiply and down projection of several experts' rows, in two parallel passes:
//  1. gate/up and SiLU-and-multiply into h (unpacked: tasks stream each expert's w13 in turn; packed: a task owns
//     one expert's column chunk of h);
//  2. the down projection: flush(i, out, ld, n0, n1) gets expert i's float32 sums for columns [n0, n1) of H, row m
//     at out + m * ld, and consumes them (vectors, not one scattered read-modify-write per value); for each chunk
//     [n0, n1), the experts come in order and then done(n0, n1) is called. Unpacked (decode), tasks stream each
//     expert's w2 in turn and a second pass flushes; packed, a task is a chunk of H across every expert.
// gu and h are (rows, 2 * max I) and (rows, max I) scratch buffers (unused when packed). With many rows per expert
// (packed = packs(ex, H)), x is first packed by 16 rows, and pass 1 writes h packed for pass 2.
template <typename Flush, typename Done>
void run_experts(std::vector<ExpertRows>& ex, bool packed, int64_t H, bf16* gu, bf16* h, int64_t ldgu, int64_t ldh,
                 const Flush& flush, const Done& done) {
  int64_t Imin = ex.empty() ? 1 : ex[0].I, Imax = 0, groups = 0;
  for (auto& e : ex) {
    Imin = std::min(Imin, e.I);
    Imax = std::max(Imax, e.I);
    e.g0 = groups;
    groups += (e.M + 15) / 16;
  }
  const int64_t xstride = H / 2 * 16, hstride = Imax / 2 * 16;  // words per packed group
  uint32_t *xpk = nullptr, *hpk = nullptr;
  if (packed) {
    xpk = scratch<uint32_t>(0, groups * xstride);
    hpk = scratch<uint32_t>(1, groups * hstride);
    uint32_t* zero = scratch<uint32_t>(2, H / 2);
    std::fill_n(zero, H / 2, 0u);
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

  if (!packed) {
    // Few rows per expert (a decode step): the gate/up projection is a weight stream, so a task is a run of rows of
    // one expert's w13, gate and up alike, expert after expert; SiLU-and-multiply follows on this thread.
    const int64_t wrows = rows_per_task(H);  // ~64 KB of w13; a multiple of 4 rows
    std::vector<int64_t> first(ex.size() + 1, 0);  // first task of each expert
    for (size_t i = 0; i < ex.size(); ++i) first[i + 1] = first[i] + (2 * ex[i].I + wrows - 1) / wrows;
    run_tasks(first.back(), [&](int64_t t) {
      const size_t i = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
      const ExpertRows& e = ex[i];
      const int64_t r0 = (t - first[i]) * wrows, r1 = std::min(2 * e.I, r0 + wrows);
      const bf16* then = r1 < 2 * e.I || i + 1 == ex.size() ? nullptr : ex[i + 1].w13;
      bf16* gue = gu + e.r0 * ldgu;
      gemm_rows(e.x, H, e.M, e.w13, 2 * e.I, H, r0, r1,
                [&](int64_t m, int64_t n, float v) { gue[m * ldgu + n] = round_bf16(v); }, then);
    });
    for (const auto& e : ex)
      for (int64_t m = 0; m < e.M; ++m)
        silu_mul(gu + (e.r0 + m) * ldgu, gu + (e.r0 + m) * ldgu + e.I, h + (e.r0 + m) * ldh, e.I);
  } else {
    // Packed (a prefill chunk): a task is one expert's columns [j0, j1) of I, i.e. gate rows j0..j1 and up rows
    // I + j0..I + j1 of w13, per block of 256 tokens as (column, token) products, then h straight into its pairs.
    const int64_t cols = std::max<int64_t>(32, rows_per_task(H) / 2 & ~31);  // of I per task
    std::vector<std::pair<int64_t, int64_t>> tasks;  // (expert, j0)
    for (size_t i = 0; i < ex.size(); ++i)
      for (int64_t j0 = 0; j0 < ex[i].I; j0 += cols) tasks.emplace_back(static_cast<int64_t>(i), j0);
    run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
      const ExpertRows& e = ex[tasks[t].first];
      const int64_t I = e.I, j0 = tasks[t].second, j1 = std::min(I, j0 + cols);
      const int64_t ng = (e.M + 15) / 16, ldo = BLOCK_GROUPS * 16 + 16, nc = j1 - j0;  // + 16: no 4 KB stride
      float* gate = scratch<float>(0, 2 * nc * ldo);
      float* up = gate + nc * ldo;
      const __m512i pairs = pairs_index(0);
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
            // pairs (h_j, h_j+1) of the group's 16 tokens; tokens past M multiply zeros: h = 0 there
            _mm512_storeu_si512(hpk + (e.g0 + b + g) * hstride + (j0 + j) / 2 * 16,
                                _mm512_permutex2var_epi16(_mm512_castsi256_si512(hv[0]), pairs,
                                                          _mm512_castsi256_si512(hv[1])));
          }
      }
    });
  }
  const int64_t rows = std::min<int64_t>(H, rows_per_task(2 * Imin));  // ~32 KB of each expert's w2 per task
  const int64_t chunks = (H + rows - 1) / rows;
  if (!packed) {
    // Few rows per expert (a decode step): the down projection is a weight stream, so its tasks go expert by
    // expert (each thread reads whole runs of one expert's w2) into a (row, H) block, and a second pass flushes
    // each chunk of H, expert after expert, as the sum needs.
    int64_t total = 0;
    for (const auto& e : ex) total = std::max(total, e.r0 + e.M);
    at::Tensor out_t = at::empty({total, H}, at::kFloat);
    float* out = out_t.data_ptr<float>();
    run_tasks(static_cast<int64_t>(ex.size()) * chunks, [&](int64_t t) {
      const ExpertRows& e = ex[t / chunks];
      const int64_t n0 = t % chunks * rows, n1 = std::min(H, n0 + rows);
      const bf16* then = n1 < H ? nullptr : t / chunks + 1 < static_cast<int64_t>(ex.size()) ? ex[t / chunks + 1].w2
                                                                                         : nullptr;
      gemm_rows(h + e.r0 * ldh, ldh, e.M, e.w2, H, e.I, n0, n1,
                [&](int64_t m, int64_t n, float v) { out[(e.r0 + m) * H + n] = v; }, then);
    });
    run_tasks(chunks, [&](int64_t t) {
      const int64_t n0 = t * rows, n1 = std::min(H, n0 + rows);
      for (size_t i = 0; i < ex.size(); ++i) flush(i, static_cast<const float*>(out + ex[i].r0 * H + n0), H, n0, n1);
      done(n0, n1);
    });
    return;
  }
  // Packed: a task is a chunk of H for every expert in turn, per block of 256 tokens (column, token) products,
  // then 16 x 16 transposes to (token, column) rows for the flush.
  int64_t Mmax = 0;
  for (const auto& e : ex) Mmax = std::max(Mmax, e.M);
  run_tasks(chunks, [&](int64_t t) {
    const int64_t n0 = t * rows, n1 = std::min(H, n0 + rows), ld = (n1 - n0 + 15) / 16 * 16;
    float* op = scratch<float>(1, (Mmax + 15) / 16 * 16 * ld);
    for (size_t i = 0; i < ex.size(); ++i) {
      const ExpertRows& e = ex[i];
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
      flush(i, static_cast<const float*>(op), ld, n0, n1);
    }
    done(n0, n1);
  });
}

at::Tensor routed_experts(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& weights,
                          const at::Tensor& ids, const c10::optional<at::Tensor>& shared_w13,
                          const c10::optional<at::Tensor>& shared_w2, int64_t first) {
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
                "shared expert ", shared_w13->sizes(), " / ", shared_w2->sizes(), " is not (2I, H) / (H, I) with H=",
                H);
  }
  const at::Tensor id = ids.to(at::kLong).contiguous(), wt = weights.to(at::kFloat).contiguous();
  const int64_t K = ids.size(1), C = T * K;  // C token copies
  const int64_t* idp = id.data_ptr<int64_t>();
  const float* wtp = wt.data_ptr<float>();

  // Copies grouped by expert, in token order within an expert (a stable sort by expert id). Under expert
  // parallelism (first >= 0) this rank holds experts first .. first + E - 1: the other copies are other ranks' work.
  const bool local = first >= 0;
  const int64_t base = local ? first : 0;
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t e = idp[c] - base;
    if (local && (e < 0 || e >= E)) continue;
    TORCH_CHECK(e >= 0 && e < E, "expert id ", idp[c], " out of range [0, ", E, ")");
    ++start[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  const int64_t R = start[E];  // the copies computed here: all C without expert parallelism
  std::vector<int64_t> fill(start.begin(), start.end() - 1), src(R);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t e = idp[c] - base;
    if (e >= 0 && e < E) src[fill[e]++] = c;  // src[row] = flat (token, k) index
  }

  const int64_t Imax = std::max(I, Is), rows_total = R + (shared ? T : 0);  // the shared expert's rows come last
  std::vector<int64_t> token(R);  // token of each grouped row
  std::vector<float> weight(R);  // its routing weight
  for (int64_t r = 0; r < R; ++r) {
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
  if (shared) ex.push_back({shared_w13->data_ptr<bf16>(), shared_w2->data_ptr<bf16>(), Is, xp, nullptr, T, R, 0});
  const bool packed = packs(ex, H);
  at::Tensor xs = at::empty({packed ? 0 : R, H}, x.options());  // unpacked: x of each copy, grouped
  at::Tensor gu = at::empty({packed ? 0 : rows_total, 2 * Imax}, x.options());  // bf16 gate | up, as F.linear
  at::Tensor h = at::empty({packed ? 0 : rows_total, Imax}, x.options());  // bf16(silu(gate) * up)
  at::Tensor acc = at::zeros({T, H}, x.options().dtype(at::kFloat));
  at::Tensor ys = at::empty({shared ? T : 0, H}, x.options());  // the shared expert's bf16 output
  at::Tensor y = at::empty({T, H}, x.options());
  bf16 *xsp = xs.data_ptr<bf16>(), *ysp = ys.data_ptr<bf16>(), *yp = y.data_ptr<bf16>();
  float* accp = acc.data_ptr<float>();
  if (!packed) {  // gemm_rows reads each expert's rows contiguous
    for (int64_t r = 0; r < R; ++r) std::copy_n(xp + token[r] * H, H, xsp + r * H);
    for (size_t i = 0; i < routed; ++i) {
      ex[i].x = xsp + ex[i].r0 * H;
      ex[i].tok = nullptr;
    }
  }

  // Routed rows: weighted, summed in float32 in expert order (as the torch path's index_add_) and rounded once;
  // the shared expert's output is rounded on its own, then added in bf16 (as `y + shared_experts(x)`).
  run_experts(ex, packed, H, gu.data_ptr<bf16>(), h.data_ptr<bf16>(), 2 * Imax, Imax,
              [&](size_t i, const float* out, int64_t ld, int64_t n0, int64_t n1) {
                const ExpertRows& e = ex[i];
                for (int64_t m = 0; m < e.M; ++m)
                  for (int64_t n = n0; n < n1; n += 16) {
                    const __mmask16 k = lanes16(n1 - n);
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
                    const __mmask16 k = lanes16(n1 - n);
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

}  // namespace glm47::cpu
