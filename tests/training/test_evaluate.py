"""Evaluation on scripted models: one that replies exactly as the reference conversation does (every metric
perfect), and ones with known faults; plus the tool-call checker's table and a real tiny checkpoint."""

import json

import pytest
import torch
from torch import nn

from glm47.chat import render_ids
from glm47.config import ModelConfig
from glm47.evaluate import TARGETS, EvalReport, Score, evaluate, evaluate_model, well_formed_calls
from glm47.model.moe import Router
from glm47.parsers import ToolCall
from glm47.tools import tool_definitions
from glm47.training.corpus import generate_examples, training_text
from glm47.training.data import encode_example
from glm47.training.train_tokenizer import train_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(training_text(generate_examples(60, seed=3)), 700)


@pytest.fixture(scope="module")
def examples():
    exs = generate_examples(40, seed=5, split="heldout")
    kinds = {e.kind for e in exs}
    assert {"tool", "no_tool", "thinking_off"} <= kinds, kinds
    return exs


class ScriptedModel(nn.Module):
    """Continues any prefix of one of `scripts` (token lists) with that script's next token; otherwise ends
    with a stop id. Its MTP drafts are right at even positions i and wrong at odd ones. Routes every token
    through one real Router so that expert load is counted."""

    def __init__(self, scripts: list[list[int]], vocab: int, stop: int, has_mtp: bool = True):
        super().__init__()
        self.scripts, self.vocab, self.stop, self.has_mtp = scripts, vocab, stop, has_mtp
        self.config = ModelConfig(vocab_size=vocab, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1, moe_intermediate_size=8,
                                  n_routed_experts=4, num_experts_per_tok=2)
        self.gate = Router(self.config)
        nn.init.normal_(self.gate.weight)
        self.lm_head = nn.Linear(1, 1)
        self.embed = nn.Embedding(vocab, 8)
        self.seq: list[int] = []

    def _next(self, prefix: list[int]) -> int:
        for s in self.scripts:
            if len(s) > len(prefix) and s[:len(prefix)] == prefix:
                return s[len(prefix)]
        return self.stop

    def forward(self, ids, positions=None, cache=None):
        row = ids[0].tolist()
        self.seq = row if positions is None or int(positions[0, 0]) == 0 else self.seq + row
        self.gate(self.embed(ids).reshape(-1, 8))
        start = len(self.seq) - len(row)
        logits = torch.zeros(1, len(row), self.vocab)
        for t in range(len(row)):
            logits[0, t, self._next(self.seq[:start + t + 1])] = 1.0
        return torch.cat([ids[..., None].float(), logits], -1)  # "hidden": the token (for mtp), then its logits

    def compute_logits(self, hidden, mtp_layer=None):
        return hidden[..., 1:]

    def mtp_forward(self, hidden, next_ids, positions=None, cache=None, layer=0):
        seq = hidden[0, :, 0].long().tolist() + next_ids[0, -1:].tolist()
        draft = torch.zeros(1, hidden.shape[1], self.vocab)
        for i in range(hidden.shape[1]):
            truth = self._next(seq[:i + 2])
            draft[0, i, truth if i % 2 == 0 else (truth + 1) % self.vocab] = 1.0
        return torch.cat([hidden[..., :1], draft], -1)


def reference_scripts(tok, examples, tamper=None):
    scripts = []
    for ex in examples:
        ids, _ = encode_example(tok, ex)
        scripts.append(tamper(ex, ids) if tamper else ids)
    return scripts


def test_a_model_that_replies_like_the_reference_scores_perfectly(tok, examples):
    model = ScriptedModel(reference_scripts(tok, examples), tok.vocab_size, tok.eos_token_ids[1])
    report = evaluate_model(model, tok, examples)
    m = report.metrics()
    assert m["tool_calls"] == m["answers"] == m["no_tool"] == m["thinking_off"] == 1.0, (m, report.failures)
    assert report.scores["tool_calls"].total == sum(bool(e.expected_calls) for e in examples)
    assert report.scores["no_tool"].total == sum(not e.expected_calls for e in examples)
    assert report.scores["answers"].total == len(examples)
    assert 0.4 < m["mtp_agreement"] < 0.6, m  # drafts are right at every other position
    assert len(report.expert_load) == 1 and report.expert_load[0] >= 1.0
    assert "BELOW TARGET" not in report.format().split("mtp_agreement")[0]


def test_faults_show_up_in_their_metric(tok, examples):
    think = tok.think_id
    user = tok.token_to_id("<|user|>")

    def tamper(ex, ids):
        # Thinking-off replies open a reasoning block; tool calls are dropped; answers are replaced.
        prompt = render_ids(tok, ex.prompt_messages, ex.tools, enable_thinking=ex.enable_thinking,
                            clear_thinking=ex.clear_thinking, add_generation_prompt=True)
        if not ex.enable_thinking:
            return prompt + [think] + tok.encode("hmm") + [user]
        return prompt + tok.encode("No idea.") + [user]

    model = ScriptedModel(reference_scripts(tok, examples, tamper), tok.vocab_size, user)
    report = evaluate_model(model, tok, examples)
    m = report.metrics()
    assert m["tool_calls"] == 0.0 and m["thinking_off"] == 0.0, m
    assert m["no_tool"] == 1.0 and m["answers"] < 0.2, m
    assert {f["metric"] for f in report.failures} >= {"tool_calls", "thinking_off", "answers"}
    assert report.passed()["tool_calls"] is False


TOOLS = tool_definitions()


@pytest.mark.parametrize("name, arguments, ok", [
    ("calculator", {"expression": "2 + 3"}, True),
    ("convert_units", {"value": 5, "from_unit": "km", "to_unit": "mi"}, True),
    ("convert_units", {"value": 2.5, "from_unit": "km", "to_unit": "mi"}, True),
    ("convert_units", {"value": "5", "from_unit": "km", "to_unit": "mi"}, False),  # number as a string
    ("date_add", {"date": "2024-01-01", "days": 3}, True),
    ("date_add", {"date": "2024-01-01", "days": 3.5}, False),  # integer
    ("date_add", {"date": "2024-01-01"}, False),  # missing argument
    ("get_weather", {"city": "Paris", "country": "FR"}, False),  # extra argument
    ("get_weather", {"city": True}, False),
    ("send_email", {"to": "x"}, False),  # not offered
])
def test_tool_call_checker(name, arguments, ok):
    call = ToolCall("call_0", name, json.dumps(arguments))
    assert well_formed_calls([call], TOOLS, name)[0] is ok


def test_first_call_must_be_the_expected_tool():
    call = ToolCall("call_0", "calculator", json.dumps({"expression": "1"}))
    assert well_formed_calls([call], TOOLS, "get_weather") == (False, "called 'calculator', expected 'get_weather'")
    assert well_formed_calls([], TOOLS, "calculator") == (False, "no tool call")


def test_report_compares_with_targets():
    scores = {name: Score(9, 10) for name in ("tool_calls", "answers", "no_tool", "thinking_off", "mtp_agreement")}
    report = EvalReport(scores, [1.2, 1.7])
    assert report.passed() == {"tool_calls": False, "answers": True, "no_tool": True, "thinking_off": False,
                               "mtp_agreement": True, "expert_load": False}
    assert set(TARGETS) == set(report.metrics())


def test_evaluate_runs_on_a_trained_checkpoint(trained):
    """End to end on a 4-step tiny run: the numbers are poor but every metric is computed."""
    report = evaluate(trained[0], n=3, max_new_tokens=8)
    m = report.metrics()
    assert all(0.0 <= m[k] <= 1.0 for k in ("tool_calls", "answers", "no_tool", "thinking_off", "mtp_agreement")
               if report.scores[k].total), m
    assert report.scores["mtp_agreement"].total > 0 and len(report.expert_load) == 2
