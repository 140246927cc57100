"""Capacity planning, pure arithmetic (stdlib + glm47.config, no torch): parameters from a config, weight
and KV-cache bytes, and the fewest GPUs that hold a request. `glm47 plan` prints it."""

from glm47.planner.gpus import GPU, GPUS, resolve_gpu
from glm47.planner.memory import WeightBytes, kv_bytes_per_token, weight_bytes, weight_bytes_per_gpu
from glm47.planner.params import ParamCount, TensorFamily, count_params, tensor_families
from glm47.planner.plan import DEFAULT_MEM_FRACTION, MAX_GPUS, Plan, TPOption, plan
from glm47.planner.report import format_plan

__all__ = ["GPU", "GPUS", "resolve_gpu", "WeightBytes", "kv_bytes_per_token", "weight_bytes",
           "weight_bytes_per_gpu", "ParamCount", "TensorFamily", "count_params", "tensor_families",
           "DEFAULT_MEM_FRACTION", "MAX_GPUS", "Plan", "TPOption", "plan", "format_plan"]
