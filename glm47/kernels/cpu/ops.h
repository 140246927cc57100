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
//                    Under expert parallelism (first >= 0) w13/w2 hold experts first..first+E-1 and only the copies
//                    routed to them are computed.
// qk_norm_rope:      per-head RMSNorm of q and k, then partial rotate-half RoPE.
// rms_norm:          RMSNorm of bf16 rows, optionally after the residual add.
// decode_attention:  one query per sequence over the paged KV cache, read in place (no gather), GQA, split-K.
// prefill_attention: a chunk's causal attention over the paged KV cache, flash-attention style.
//
// Numerics follow the torch path in glm47/model (its slow twin): every projection rounds its float32 sum to bf16
// once; silu(gate) and silu(gate) * up are each rounded to bf16; the expert outputs are weighted and summed in
// float32 in expert order and rounded once; attention rounds the probabilities to bf16 for P.V, as SDPA's CPU
// flash kernel does. Built with -ffp-contract=off so that no mul + add becomes an FMA where torch has none.
//
// One file per op (linear.cpp, moe.cpp, norm.cpp, decode_attention.cpp, prefill_attention.cpp), the shared pieces
// in common.h, gemm.h and paged.h, the Python bindings in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace glm47::cpu {

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  bool float_out);
std::vector<at::Tensor> route(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, int64_t top_k,
                              int64_t n_group, int64_t topk_group, bool norm, double scale);
at::Tensor routed_experts(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& weights,
                          const at::Tensor& ids, const c10::optional<at::Tensor>& shared_w13,
                          const c10::optional<at::Tensor>& shared_w2, int64_t first);
std::vector<at::Tensor> rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& add, const at::Tensor& w,
                                 double eps);
std::vector<at::Tensor> qk_norm_rope(const at::Tensor& qkv, int64_t H, int64_t Hkv, int64_t D,
                                     const c10::optional<at::Tensor>& q_w, const c10::optional<at::Tensor>& k_w,
                                     double eps, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& lens, double scale);
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& block_table, int64_t ctx, double scale);

}  // namespace glm47::cpu
