// RMSNorm (alone or after the residual add) and the attention prologue (q/k RMSNorm + RoPE).

#include "ops.h"
#include "common.h"

namespace glm47::cpu {

// ---- RMSNorm, alone or after the residual add

// out = bf16(w * bf16(x * r)), r = 1 / sqrt(mean(x^2) + eps), for one row of D bf16 values: RMSNorm.forward's
// rounding (normalised in float32, rounded, times the bf16 weight, rounded).
inline void rms_norm_row(const bf16* x, const bf16* w, float eps, int64_t D, bf16* out) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 k = lanes16(D - d);
    const __m512 v = bf16x16_to_float(_mm256_maskz_loadu_epi16(k, x + d));
    ss = _mm512_add_ps(ss, _mm512_mul_ps(v, v));
  }
  const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(D) + eps));
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 k = lanes16(D - d);
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
              "the residual ", adding ? add->sizes() : x.sizes(), " must be a contiguous bf16 tensor like x ",
              x.sizes());
  at::Tensor sum = adding ? at::empty_like(x) : x, out = at::empty_like(x);
  const bf16 *xp = x.data_ptr<bf16>(), *ap = adding ? add->data_ptr<bf16>() : nullptr, *wp = w.data_ptr<bf16>();
  bf16 *sp = sum.data_ptr<bf16>(), *op = out.data_ptr<bf16>();
  const int64_t chunk = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));  // rows per task
  run_tasks((T + chunk - 1) / chunk, [&](int64_t task) {
    for (int64_t t = task * chunk; t < std::min(T, (task + 1) * chunk); ++t) {
      if (adding)
        for (int64_t d = 0; d < D; d += 16) {
          const __mmask16 k = lanes16(D - d);
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

// bf16(bf16(x * c) + bf16(y * s)) for 16 values held as floats: one lane of RoPE as apply_rope rounds it.
inline __m256i rope16(__m512 x, __m512 c, __m512 y, __m512 s) {
  return round_bf16x16(_mm512_add_ps(bf16x16_to_float(round_bf16x16(_mm512_mul_ps(x, c))),
                                     bf16x16_to_float(round_bf16x16(_mm512_mul_ps(y, s)))));
}

// Rotate-half RoPE of one head x (D bf16) into out, on its first `rot` values (the rest copied): out[i] =
// bf16(bf16(x[i] * cos[i]) + bf16(rotate_half(x)[i] * sin[i])), rotate_half(x) = [-x[half:rot], x[:half]].
inline void rope_head(const bf16* x, const bf16* cos, const bf16* sin, int64_t rot, int64_t D, bf16* out) {
  const int64_t half = rot / 2;
  const auto load = [](const bf16* p, __mmask16 k) { return bf16x16_to_float(_mm256_maskz_loadu_epi16(k, p)); };
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 k = lanes16(half - i);
    const __m512 a = load(x + i, k), b = load(x + half + i, k);
    const __m512 neg_b = _mm512_sub_ps(_mm512_setzero_ps(), b);
    _mm256_mask_storeu_epi16(out + i, k, rope16(a, load(cos + i, k), neg_b, load(sin + i, k)));
    _mm256_mask_storeu_epi16(out + half + i, k, rope16(b, load(cos + half + i, k), a, load(sin + half + i, k)));
  }
  std::memcpy(out + rot, x + rot, (D - rot) * sizeof(bf16));
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
    qw = q_w->to(at::kBFloat16).contiguous();  // RMSNorm's weight, in the model's dtype
    kw = k_w->to(at::kBFloat16).contiguous();
  }
  at::Tensor q = at::empty({T, H, D}, qkv.options()), k = at::empty({T, Hkv, D}, qkv.options());
  const bf16 *src = qkv.data_ptr<bf16>(), *cp = cos.data_ptr<bf16>(), *sp = sin.data_ptr<bf16>();
  bf16 *qp = q.data_ptr<bf16>(), *kp = k.data_ptr<bf16>();
  const int64_t ld = qkv.stride(0), chunk = std::max<int64_t>(1, 16384 / ((H + Hkv) * D));  // rows per task
  const bf16 *qwp = norm ? qw.data_ptr<bf16>() : nullptr, *kwp = norm ? kw.data_ptr<bf16>() : nullptr;
  run_tasks((T + chunk - 1) / chunk, [&](int64_t task) {
    std::vector<bf16> normed(D);
    for (int64_t t = task * chunk; t < std::min(T, (task + 1) * chunk); ++t) {
      for (int64_t j = 0; j < H + Hkv; ++j) {
        const bf16* x = src + t * ld + j * D;
        if (norm) {  // over the whole head, before RoPE
          rms_norm_row(x, j < H ? qwp : kwp, static_cast<float>(eps), D, normed.data());
          x = normed.data();
        }
        rope_head(x, cp + t * rot, sp + t * rot, rot, D, j < H ? qp + (t * H + j) * D : kp + (t * Hkv + j - H) * D);
      }
    }
  });
  return {q, k};
}

}  // namespace glm47::cpu
