"""Evaluation of a (nano) GLM-4.7 checkpoint on held-out agent conversations, by greedy decoding with the
model itself (batch 1, `KVCache`), independent of the engine. Per conversation it measures:

- tool calls: where the last user turn needs a tool, the first reply parses (glm47.parsers) into calls to
  offered tools with the schema's argument names and types, the first one the expected tool;
- answers: after the reference calls and results are teacher-forced, the final content contains `answer`;
- no tool: where none is needed, the reply calls none;
- thinking off: with thinking switched off, the reply opens no reasoning block;
- MTP agreement: on every greedy continuation, how often the MTP draft for i+2 (from h_i and t_{i+1})
  equals the main model's greedy token at i+2;
- expert load: max/mean routed tokens per MoE layer over the evaluated sequences.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from glm47.chat import Tokenizer, render_ids
from glm47.checkpoint.loader import load_model
from glm47.model.kv_cache import KVCache
from glm47.parsers import parse_output
from glm47.training.balance import ExpertLoadTracker, load_ratio
from glm47.training.corpus import generate_examples

# metric -> (target, True when higher is better)
TARGETS = {"tool_calls": (0.95, True), "answers": (0.85, True), "no_tool": (0.90, True),
           "thinking_off": (0.95, True), "mtp_agreement": (0.60, True), "expert_load": (1.5, False)}
_JSON_TYPES = {"string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,),
               "object": (dict,), "array": (list,)}


@dataclass(slots=True)
class Score:
    ok: int = 0
    total: int = 0

    def add(self, ok: bool) -> None:
        self.ok += bool(ok)
        self.total += 1

    @property
    def rate(self) -> float:
        return self.ok / self.total if self.total else float("nan")


@dataclass(slots=True)
class EvalReport:
    scores: dict[str, Score]  # tool_calls, answers, no_tool, thinking_off, mtp_agreement
    expert_load: list[float]  # max/mean per MoE layer (main layers, then MTP)
    failures: list[dict] = field(default_factory=list)  # what went wrong, a few per metric

    def metrics(self) -> dict[str, float]:
        out = {name: s.rate for name, s in self.scores.items()}
        out["expert_load"] = max(self.expert_load, default=float("nan"))
        return out

    def passed(self) -> dict[str, bool]:
        return {name: (value >= TARGETS[name][0]) if TARGETS[name][1] else (value <= TARGETS[name][0])
                for name, value in self.metrics().items()}

    def format(self) -> str:
        lines = []
        for name, value in self.metrics().items():
            target, higher = TARGETS[name]
            mark = "ok" if self.passed()[name] else "BELOW TARGET"
            if name == "expert_load":
                detail = "per layer " + " ".join(f"{r:.2f}" for r in self.expert_load)
                lines.append(f"{name:14s} {value:6.2f}  (target <= {target})  {mark}  {detail}")
            else:
                s = self.scores[name]
                lines.append(f"{name:14s} {value:6.1%}  (target >= {target:.0%})  {mark}  {s.ok}/{s.total}")
        return "\n".join(lines)


@torch.no_grad()
def greedy_generate(model, prompt: list[int], stop_ids: set[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt` (batch 1, KV cache), ending with a stop id when one is produced."""
    cache = KVCache.for_model(model.config, 1, len(prompt) + max_new_tokens, dtype=model.lm_head.weight.dtype)
    ids = torch.tensor([prompt])
    positions = torch.arange(len(prompt))[None]
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model.compute_logits(model(ids, positions, cache))
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token in stop_ids:
            break
        ids = torch.tensor([[token]])
        positions = positions[:, -1:] + 1
    return out


@torch.no_grad()
def mtp_agreement(model, ids: list[int], prompt_len: int) -> tuple[int, int]:
    """(agreements, positions): for each generated token at j >= prompt_len + 1 (the first one has no
    draft: drafting starts from the first generated token), whether the MTP draft made at i = j - 2
    (from h_i and t_{i+1}) equals it."""
    x = torch.tensor([ids])
    hidden = model(x)
    draft = model.compute_logits(model.mtp_forward(hidden[:, :-1], x[:, 1:]), mtp_layer=0)  # [:, i] predicts ids[i + 2]
    first = max(prompt_len - 1, 0)  # i for j = prompt_len + 1
    guess = draft[0, first:len(ids) - 2].argmax(-1)
    truth = x[0, first + 2:]
    return int((guess == truth).sum()), int(truth.numel())


def well_formed_calls(calls, tools: list[dict] | None, expected_name: str) -> tuple[bool, str]:
    """Every call names an offered tool with exactly its parameters, each of the schema's JSON type, and
    the first call is `expected_name`. Returns (ok, why not)."""
    if not calls:
        return False, "no tool call"
    schemas = {t["function"]["name"]: t["function"].get("parameters", {}).get("properties", {}) for t in tools or ()}
    for call in calls:
        if call.name not in schemas:
            return False, f"unknown tool {call.name!r}"
        try:
            args = json.loads(call.arguments)
        except json.JSONDecodeError:
            return False, f"arguments are not JSON: {call.arguments!r}"
        props = schemas[call.name]
        if not isinstance(args, dict) or set(args) != set(props):
            return False, f"{call.name} arguments {sorted(args) if isinstance(args, dict) else args!r} != {sorted(props)}"
        for key, value in args.items():
            kinds = _JSON_TYPES.get(props[key].get("type"), (object,))
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                return False, f"{call.name}.{key}={value!r} is not a {props[key].get('type')}"
    if calls[0].name != expected_name:
        return False, f"called {calls[0].name!r}, expected {expected_name!r}"
    return True, ""


class _Evaluator:
    def __init__(self, model, tokenizer: Tokenizer, max_new_tokens: int):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.stop_ids = set(tokenizer.eos_token_ids)
        self.tracker = ExpertLoadTracker(model)
        self.mtp = Score()

    def reply(self, messages: list[dict], example) -> tuple[list[int], str]:
        """The model's greedy reply to `messages` (ids, text without the stop token); also scores MTP
        agreement and counts expert load on prompt + reply."""
        prompt = render_ids(self.tokenizer, messages, example.tools, enable_thinking=example.enable_thinking,
                            clear_thinking=example.clear_thinking, add_generation_prompt=True)
        self.tracker.enabled = False
        out = greedy_generate(self.model, prompt, self.stop_ids, self.max_new_tokens)
        self.tracker.enabled = True
        if self.model.has_mtp:
            agree, total = mtp_agreement(self.model, prompt + out, len(prompt))
            self.mtp.ok += agree
            self.mtp.total += total
        else:  # still count the expert load over the same tokens
            self.model(torch.tensor([prompt + out]))
        body = out[:-1] if out and out[-1] in self.stop_ids else out
        return out, self.tokenizer.decode(body)


def evaluate_model(model, tokenizer: Tokenizer, examples, max_new_tokens: int = 128,
                   progress: bool = False, max_failures: int = 5) -> EvalReport:
    """Scores `model` on corpus Examples (see glm47.training.corpus.Example)."""
    model.eval()
    ev = _Evaluator(model, tokenizer, max_new_tokens)
    scores = {name: Score() for name in ("tool_calls", "answers", "no_tool", "thinking_off")}
    failures: list[dict] = []

    def record(metric: str, ok: bool, example, text: str, why: str = "") -> None:
        scores[metric].add(ok)
        if not ok and sum(f["metric"] == metric for f in failures) < max_failures:
            failures.append({"metric": metric, "kind": example.kind, "user": example.prompt_messages[-1]["content"],
                             "output": text, "why": why, "answer": example.answer})

    for ex in tqdm(examples, desc="evaluate", disable=not progress, dynamic_ncols=True):
        first_ids, first = ev.reply(ex.prompt_messages, ex)
        parsed = parse_output(first, ex.tools, thinking=ex.enable_thinking, call_id=lambda i: f"call_{i}")
        if ex.expected_calls:
            ok, why = well_formed_calls(parsed.tool_calls, ex.tools, ex.expected_calls[0][0])
            record("tool_calls", ok, ex, first, why)
        else:
            record("no_tool", not parsed.tool_calls and "<tool_call>" not in first, ex, first, "called a tool")
        if not ex.enable_thinking:
            opened = (bool(first_ids) and first_ids[0] == tokenizer.think_id) or "<think>" in first or "</think>" in first
            record("thinking_off", not opened, ex, first, "reasoning with thinking off")
        if ex.expected_calls:  # teacher-force the reference calls and results, then ask for the answer
            _, final = ev.reply(ex.messages[:-1], ex)
            parsed = parse_output(final, ex.tools, thinking=ex.enable_thinking, call_id=lambda i: f"call_{i}")
        else:
            final = first
        content = parsed.content or ""
        record("answers", ex.answer in content, ex, final, f"content lacks {ex.answer!r}")
    ev.tracker.close()
    scores["mtp_agreement"] = ev.mtp
    ratios = [round(float(r), 3) for r in load_ratio(ev.tracker.counts)]
    return EvalReport(scores, ratios, failures)


def evaluate(model_dir: str | Path, n: int = 200, seed: int = 0, max_new_tokens: int = 128,
             progress: bool = False) -> EvalReport:
    """Loads a checkpoint directory (with its tokenizer.json) and scores it on `n` held-out conversations
    of the synthetic corpus (split "heldout", `seed`)."""
    model = load_model(model_dir, dtype=torch.float32)  # bf16 weights are exact in float32; CPU decodes faster
    tokenizer = Tokenizer.from_dir(model_dir)
    return evaluate_model(model, tokenizer, generate_examples(n, seed, "heldout"), max_new_tokens, progress)
