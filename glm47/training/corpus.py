"""Synthetic agent conversations for training a nano GLM-4.7 to think briefly, call the built-in tools and
answer from their results. Seeded and reproducible: example i depends only on (seed, split, i). The
held-out split draws every value a user types (numbers, dates, cities, names) from its own part of a fixed
partition (`split_of`), so no held-out value appears in a training example. The turns themselves and their
phrasings are in corpus_turns.py. No torch and no engine here: this only writes messages.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from glm47.chat import render_prompt
from glm47.tools import BUILTIN, tool_definitions
from glm47.training.corpus_turns import (
    MULTI_TOOL, SINGLE_TOOL, Turn, Values, chat_turn, error_turn, follow_up, fresh_turn, split_of,
)

__all__ = ["KINDS", "SPLITS", "Example", "generate_examples", "render_example", "split_of", "training_text"]

SPLITS = ("train", "heldout")
# kind -> share of a corpus. thinking_off turns are single-turn; multi_turn ends with any kind of turn.
KINDS = {"tool": 0.28, "multi_tool": 0.17, "no_tool": 0.12, "thinking_off": 0.15, "multi_turn": 0.22,
         "tool_error": 0.06}
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
                  "You are a friendly assistant that uses tools when needed.", "Answer in one short sentence."]


@dataclass(slots=True)
class Example:
    messages: list[dict]  # the whole conversation, ending with the reference assistant answer
    tools: list[dict] | None  # tool definitions offered (None: no tools block)
    enable_thinking: bool  # for the final user turn (its assistant messages have reasoning_content iff True)
    clear_thinking: bool  # False: earlier turns' reasoning stays in the prompt (preserved thinking)
    kind: str  # one of KINDS
    answer: str  # the final assistant content must contain this to count as correct
    expected_calls: list[tuple[str, dict]] = field(default_factory=list)  # the last user turn's calls

    @property
    def prompt_messages(self) -> list[dict]:
        """The conversation up to and including the last user message: what a model is asked to continue."""
        last_user = max(i for i, m in enumerate(self.messages) if m["role"] == "user")
        return self.messages[: last_user + 1]


def generate_examples(n: int, seed: int, split: str = "train") -> list[Example]:
    """n examples of the given split, mixing KINDS; generate_examples(k, s) is a prefix of (n > k, s)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [_example(random.Random(f"{split}:{seed}:{i}"), split) for i in range(n)]


def render_example(example: Example) -> str:
    """The whole conversation as GLM-4.7 prompt text (no generation prompt after the final answer)."""
    return render_prompt(example.messages, example.tools, enable_thinking=example.enable_thinking,
                         clear_thinking=example.clear_thinking, add_generation_prompt=False)


def training_text(examples: Iterable[Example]) -> Iterator[str]:
    """Every rendered conversation: text to train a tokenizer on (it covers all messages and tool blocks)."""
    for ex in examples:
        yield render_example(ex)


# ---- examples ----------------------------------------------------------------------------------------------

def _example(rng: random.Random, split: str) -> Example:
    v = Values(rng, split)
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    history: list[tuple[Turn, bool]] = []  # earlier turns, each with its own thinking switch
    thinking, clear = kind != "thinking_off", True
    if kind == "multi_turn":
        for i in range(1 if rng.random() < 0.7 else 2):
            history.append((fresh_turn(v, first=i == 0), rng.random() < 0.8))
        follow = follow_up(v, history[-1][0].facts) if rng.random() < 0.6 else None
        final = follow or fresh_turn(v, first=False)
        thinking, clear = rng.random() < 0.8, rng.random() < 0.65
    elif kind == "tool":
        final = rng.choice(SINGLE_TOOL)(v)
    elif kind == "multi_tool":
        final = rng.choice(MULTI_TOOL)(v)
    elif kind == "no_tool":
        final = chat_turn(v)
    elif kind == "tool_error":
        final = error_turn(v)
    else:
        final = fresh_turn(v)
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.15 else []
    for turn, turn_thinking in [*history, (final, thinking)]:
        messages += _turn_messages(turn, turn_thinking)
    needed = {call["function"]["name"] for m in messages for call in m.get("tool_calls", ())}
    expected = [(name, dict(args)) for _, calls in final.rounds for name, args, _ in calls]
    return Example(messages, _offer(rng, needed), thinking, clear, kind, final.answer, expected)


def _turn_messages(turn: Turn, thinking: bool) -> list[dict]:
    out = [{"role": "user", "content": turn.user}]
    for reasoning, calls in turn.rounds:
        out.append(_assistant(reasoning if thinking else None, "", calls))
        out += [{"role": "tool", "content": result} for _, _, result in calls]
    out.append(_assistant(turn.reasoning if thinking else None, turn.content, []))
    return out


def _assistant(reasoning: str | None, content: str, calls: list[tuple[str, dict, str]]) -> dict:
    m: dict = {"role": "assistant", "content": content}
    if reasoning is not None:  # absent, not empty, when thinking is off: the turn renders as a bare </think>
        m["reasoning_content"] = reasoning
    if calls:
        m["tool_calls"] = [{"type": "function", "function": {"name": name, "arguments": dict(args)}}
                           for name, args, _ in calls]
    return m


def _offer(rng: random.Random, needed: set[str]) -> list[dict] | None:
    """Mostly every built-in tool (what `glm47 chat` offers); sometimes only some, always including those
    the conversation calls; sometimes no tools block at all when nothing is called."""
    r = rng.random()
    if not needed and r < 0.3:
        return None
    if r < 0.7:
        return tool_definitions()
    others = [name for name in BUILTIN if name not in needed]
    chosen = needed | set(rng.sample(others, rng.randint(0 if needed else 1, len(others))))
    return tool_definitions([name for name in BUILTIN if name in chosen])
