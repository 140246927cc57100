"""TextDriver, the one loop between the engine and text for LLM and the server: engine outputs become TextDeltas
(stop token hidden, text and tokens cut at a stop string), a request a stop string ended is aborted in the engine
and retired, and CompletionOutput adds the deltas up."""

import pytest

from glm47.chat import EOS_TOKEN_IDS
from glm47.engine.llm_engine import StepOutput
from glm47.sampling_params import SamplingParams
from glm47.text import CompletionOutput, TextDelta, TextDriver, chat_finish_reason

USER = 151336  # <|user|>, one of the eos ids


class RecordingEngine:
    """The engine interface the driver uses; step() hands out what a test queued."""

    def __init__(self):
        self.eos_token_ids = frozenset(EOS_TOKEN_IDS)
        self.added, self.aborted, self.queued = [], [], []

    def add_request(self, prompt_token_ids, params, request_id=None):
        self.added.append(request_id)
        return request_id or f"r{len(self.added)}"

    def abort(self, request_id):
        self.aborted.append(request_id)
        return True

    def step(self):
        out, self.queued = self.queued, []
        return out


def test_a_stop_string_cuts_text_and_tokens_aborts_the_engine_request_and_retires_it(tok):
    engine = RecordingEngine()
    driver = TextDriver(engine, tok)
    rid = driver.add([1, 2], SamplingParams(stop=["world"]), index=3, output_index=1)
    ids = tok.encode("Hello world and more")
    k = next(k for k in range(1, len(ids) + 1) if "world" in tok.decode(ids[:k]))  # the token that completes it
    d = driver.feed(StepOutput(rid, ids, False, logprobs=[-1.0] * len(ids), top_logprobs=[[]] * len(ids)))
    assert (d.index, d.output_index, d.text, d.finish_reason, d.stop_string) == (3, 1, "Hello ", "stop", "world")
    assert d.token_ids == ids[:k] and d.logprobs == [-1.0] * k, (d.token_ids, ids, k)
    assert engine.aborted == [rid] and rid not in driver and len(driver) == 0
    assert driver.feed(StepOutput(rid, [], True, "abort")) is None  # the engine's own notice is not news


def test_the_stop_token_ends_the_text_unseen_and_leaves_the_engine_alone(tok):
    engine = RecordingEngine()
    driver = TextDriver(engine, tok)
    rid = driver.add([1], SamplingParams(), index=0)
    ids = tok.encode("Done.")
    first = driver.feed(StepOutput(rid, ids, False))
    last = driver.feed(StepOutput(rid, [USER], True, "stop"))
    assert first.text + last.text == "Done." and last.token_ids == [USER]
    assert (first.finish_reason, last.finish_reason, last.stop_string) == (None, "stop", None)
    assert engine.aborted == [] and len(driver) == 0


def test_abort_gives_the_last_delta_once_and_step_skips_requests_it_no_longer_follows(tok):
    engine = RecordingEngine()
    driver = TextDriver(engine, tok)
    a = driver.add([1], SamplingParams(), index=0, request_id="a")
    b = driver.add([1], SamplingParams(), index=1, request_id="b")
    assert driver.abort(a) == TextDelta(0, 0, "", [], "abort") and driver.abort(a) is None
    engine.queued = [StepOutput("a", [], True, "abort"), StepOutput(b, tok.encode("hi"), False),
                     StepOutput("someone-else", [5], False)]
    assert [(d.index, d.text) for d in driver.step()] == [(1, "hi")]
    assert [d.finish_reason for d in driver.abort_all()] == ["abort"] and engine.aborted == ["a", "b"]


def test_completion_output_adds_the_deltas_up():
    out = CompletionOutput(0)
    out.add(TextDelta(0, 0, "Hel", [1], logprobs=[-0.5], top_logprobs=[[(1, -0.5)]], num_cached_tokens=16,
                      prompt_logprobs=[None, -2.0], prompt_top_logprobs=[[], [(7, -2.0)]]))
    out.add(TextDelta(0, 0, "lo", [2, 3], logprobs=[-0.1, -0.2], top_logprobs=[[], []]))
    assert not out.finished
    out.add(TextDelta(0, 0, "", [], "stop", "###"))
    assert (out.text, out.token_ids, out.logprobs, out.finish_reason, out.stop_string) == (
        "Hello", [1, 2, 3], [-0.5, -0.1, -0.2], "stop", "###")
    assert out.num_cached_tokens == 16 and out.prompt_logprobs == [None, -2.0] and len(out.top_logprobs) == 3
    assert CompletionOutput(1).text == "" and CompletionOutput(1).logprobs is None


@pytest.mark.parametrize("reason, calls, expected", [
    ("stop", 1, "tool_calls"), ("stop", 0, "stop"), ("length", 2, "length"), ("abort", 1, "abort"),
    (None, 1, None),
])
def test_a_chat_reply_that_stopped_after_complete_calls_finishes_with_tool_calls(reason, calls, expected):
    assert chat_finish_reason(reason, calls) == expected
