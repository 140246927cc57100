// linear: y = x @ W^T (+ bias) for a few bf16 rows, W read once at memory speed.

#include "ops.h"
#include "common.h"
#include "gemm.h"

namespace glm47::cpu {

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

}  // namespace glm47::cpu
