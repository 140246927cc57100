"""The human-readable plan: every figure with the arithmetic that produced it."""

from __future__ import annotations

from glm47.planner.memory import GB, KV_DTYPES
from glm47.planner.plan import Plan


def _e9(n: float) -> str:
    return f"{n / 1e9:.2f}e9"


def _count(n: int) -> str:
    return _e9(n) if n >= 10**8 else f"{n:,}"


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def _ctx(p: Plan, gpus: int | None) -> str:
    o = p.option(gpus)
    if o is None:
        return "-"
    if o.kv_token_capacity == 0:
        return "none (weights alone overflow)"
    if o.max_context == p.config.max_position_embeddings:
        return f"{o.max_context:,} tokens (model max; KV room for {o.kv_token_capacity:,})"
    return f"{o.max_context:,} tokens"


def format_plan(p: Plan) -> str:
    c, w, pc = p.config, p.weights, p.params
    gpu = p.gpu.name.upper() if not p.gpu.name.startswith("custom:") else p.gpu.name
    seqs = "sequence" if p.batch == 1 else "sequences"
    mtp_layers = c.num_nextn_predict_layers if p.mtp else 0
    lines = [
        f"glm47 plan: {p.model}, {p.quant.upper()} weights, {p.kv_dtype.upper()} KV cache, "
        f"MTP {'on' if p.mtp else 'off'}, {p.context:,} tokens x {p.batch} {seqs}, {gpu}",
        "",
        f"model        {c.num_hidden_layers} layers" + (f" + {mtp_layers} MTP" if mtp_layers else "")
        + f", hidden {c.hidden_size}, {c.n_routed_experts} experts ({c.num_experts_per_tok} per token), "
          f"{c.num_key_value_heads} KV heads x {c.head_dim}, max context {c.max_position_embeddings:,}",
    ]
    if p.mtp:
        lines.append(f"params       {_e9(pc.total)} total = {_e9(pc.main)} main model + {_e9(pc.mtp_params)} MTP "
                     f"layer (its embedding and LM head are the main model's)")
    else:
        lines.append(f"params       {_e9(pc.total)} total (main model; MTP layer left out)")
    always_on = pc.active - pc.routed_experts * pc.experts_per_token // pc.n_routed_experts
    lines.append(f"             {_e9(pc.active)} active per token = {_e9(always_on)} always on + "
                 f"{pc.experts_per_token}/{pc.n_routed_experts} x {_e9(pc.routed_experts)} routed experts "
                 f"(main model, without embedding and LM head; with them {_e9(pc.active_with_embeddings)})")
    fp32 = f" + {_count(w.fp32_params)} x 4 B (FP32 router bias)" if w.fp32_params else ""
    scales = f" + {w.scale_bytes / GB:.2f} GB FP8 scales" if w.scale_bytes else ""
    lines.append(f"weights      {_gb(w.total)} = {_e9(w.linear_params)} linear x {w.linear_bytes_per_param} B "
                 f"({w.quant.upper()}) + {_e9(w.bf16_params)} x 2 B (BF16: embedding, head, norms, router, "
                 f"biases{', eh_proj' if p.mtp else ''}){fp32}{scales}")
    layers = f"{p.kv_layers} layers" + (f" ({c.num_hidden_layers} + {mtp_layers} MTP)" if mtp_layers else "")
    lines.append(f"KV / token   {p.kv_bytes_per_token:,} B = {layers} x 2 (K, V) x {c.num_key_value_heads} KV heads "
                 f"x {c.head_dim} head_dim x {KV_DTYPES[p.kv_dtype]} B ({p.kv_dtype.upper()})")
    lines.append(f"KV cache     {_gb(p.kv_cache_bytes)} = {p.kv_bytes_per_token:,} B x {p.context:,} tokens "
                 f"x {p.batch} {seqs}")
    lines.append(f"GPU          {gpu} {p.gpu.memory_gb:g} GB x {p.mem_fraction:g} = "
                 f"{_gb(p.usable_bytes_per_gpu)} usable per GPU for weights + KV cache")
    if not p.gpu.fp8 and "fp8" in (p.quant, p.kv_dtype):
        lines.append(f"             ({gpu} has no FP8 tensor cores: engines run FP8 weight-only; memory as shown)")
    lines += ["", "  GPUs  weights/GPU  KV/GPU    total/GPU  fits  largest context per sequence at this batch"]
    last = p.next_gpus or p.options[-1].gpus
    for o in p.options:
        if o.gpus > last:
            break
        note = f" (KV split {o.kv_shards} ways: heads replicated)" if o.kv_shards < o.gpus else ""
        lines.append(f"  {o.gpus:>4}  {o.weights_per_gpu / GB:>8.1f} GB  {o.kv_per_gpu / GB:>5.1f} GB  "
                     f"{o.total_per_gpu / GB:>6.1f} GB  {'yes' if o.fits else 'no ':<4}  "
                     f"{_ctx(p, o.gpus)}{note}")
    lines.append("")
    if p.min_gpus is None:
        lines.append(f"does not fit: {p.options[-1].gpus} x {gpu} is not enough for {p.context:,} tokens x "
                     f"{p.batch} {seqs} (largest tensor-parallel degree considered)")
    else:
        nxt = (f"; on {p.next_gpus}: {_ctx(p, p.next_gpus)}" if p.next_gpus else "")
        lines.append(f"min GPUs     {p.min_gpus} x {gpu} (tensor parallel {p.min_gpus}); largest context there at "
                     f"batch {p.batch}: {_ctx(p, p.min_gpus)}{nxt}")
    return "\n".join(lines)
