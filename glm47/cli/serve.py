"""`glm47 serve`: OpenAI- and Anthropic-compatible HTTP server over one engine (FastAPI + uvicorn).
Without --model it serves the embedded nano GLM-4.7 (glm47/assets), which thinks and calls the built-in tools:
a working demo with no download."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from glm47.cli.common import SPECULATIVE_HELP

DEFAULT_MODEL_NAME = "glm-4.7"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over OpenAI- and Anthropic-compatible HTTP APIs",
                       description="Serves /v1/chat/completions, /v1/completions, /v1/messages (Claude Code), "
                                   "/v1/messages/count_tokens, /v1/models, /tokenize, /detokenize, /health and "
                                   "/metrics. SIGTERM lets in-flight requests finish, then exits 0; an engine failure "
                                   "stops it the same way with exit status 1, for a supervisor to restart it.")
    p.add_argument("--model", help="checkpoint directory (default: the embedded nano GLM-4.7, glm47/assets)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("GLM47_API_KEY"),
                   help="require this key (x-api-key or Authorization: Bearer); default $GLM47_API_KEY")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help=f"model name(s) clients may ask for; the first is reported (default: {DEFAULT_MODEL_NAME})")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache size in tokens")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequences batched at once")
    p.add_argument("--speculative-tokens", type=int, default=None, metavar="N", help=SPECULATIVE_HELP)
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1, metavar="N",
                   help="split the model over N processes of this host (gloo on CPU, NCCL on GPUs: one GPU each)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="with --tensor-parallel-size: each process runs whole experts, a block of them (EP = TP)")
    p.add_argument("--max-num-requests", type=int, default=1024,
                   help="requests queued or running before new ones get 503 + Retry-After")
    p.add_argument("--max-request-bytes", type=int, default=32 * 2**20, help="larger bodies get 413")
    p.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                   help="Host header names requests may use, '*' for any (default: localhost names when bound "
                        "to loopback without --api-key, else any), e.g. behind a reverse proxy")
    p.add_argument("--preserve-thinking", action="store_true",
                   help="keep every turn's reasoning in the prompt unless a request says clear_thinking")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from glm47.cli.common import model_dir
    from glm47.chat import Tokenizer
    from glm47.engine.llm_engine import LLMEngine
    from glm47.server.app import serve
    from glm47.server.context import ServerConfig

    # glm47's own log lines (kernels built, weights on huge pages, a request that failed) in uvicorn's style
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger = logging.getLogger("glm47")
    logger.addHandler(handler)
    logger.setLevel(args.log_level.upper())
    logger.propagate = False
    model = Path(model_dir(args.model))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = {k: v for k, v in (("kv_cache_tokens", args.kv_cache_tokens), ("max_model_len", args.max_model_len),
                                 ("max_num_seqs", args.max_num_seqs),
                                 ("num_speculative_tokens", args.speculative_tokens)) if v is not None}
    if "max_num_seqs" in options:  # keep EngineConfig's rule max_num_batched_tokens >= max_num_seqs
        options["max_num_batched_tokens"] = max(2048, options["max_num_seqs"])
    config = ServerConfig(served_model_names=args.served_model_name or [DEFAULT_MODEL_NAME], api_key=args.api_key,
                          max_request_bytes=args.max_request_bytes, max_num_requests=args.max_num_requests,
                          clear_thinking=not args.preserve_thinking,
                          allowed_hosts=None if args.allowed_hosts is None else frozenset(args.allowed_hosts))
    tp, parallel, ranks = args.tensor_parallel_size, None, []
    if tp > 1:
        from glm47.engine.ranks import free_port, init_ranks, start_local_ranks

        port = free_port()
        ranks = start_local_ranks(tp, port, str(model), args.dtype, device, options, args.enable_expert_parallel)
        parallel = init_ranks(0, tp, port, torch.device(device), args.enable_expert_parallel)
        if device == "cuda":
            device = "cuda:0"
            torch.cuda.set_device(0)
    try:
        engine = LLMEngine.from_path(model, dtype=getattr(torch, args.dtype), device=device, parallel=parallel,
                                     **options)
        tokenizer = Tokenizer.from_dir(model)
        print(f"glm47 serve: {model} as {', '.join(config.served_model_names)} on http://{args.host}:{args.port} "
              f"({device}{f', {tp} tensor-parallel ranks' if tp > 1 else ''}, context {engine.max_model_len}, "
              f"KV pool {engine.pool_tokens} tokens)", file=sys.stderr)
        code = serve(engine, tokenizer, config, host=args.host, port=args.port, log_level=args.log_level,
                     drain_timeout=args.drain_timeout)
        engine.shutdown()
    finally:
        for p in ranks:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return code
