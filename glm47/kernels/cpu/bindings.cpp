// The Python module: glm47.kernels loads it with torch.utils.cpp_extension.

#include <torch/extension.h>

#include "ops.h"

namespace {

bool cpu_supported() { return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw"); }

}  // namespace

using namespace glm47::cpu;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x @ weight.T (+ bias) for a few bf16 rows", py::arg("x"), py::arg("weight"),
        py::arg("bias") = py::none(), py::arg("float_out") = false);
  m.def("routed_experts", &routed_experts, "weighted sum of each token's routed experts, plus the shared expert (bf16)",
        py::arg("x"), py::arg("w13"), py::arg("w2"), py::arg("weights"), py::arg("ids"),
        py::arg("shared_w13") = py::none(), py::arg("shared_w2") = py::none(), py::arg("first") = -1);
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
