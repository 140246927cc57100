"""The LLM facade: text in and out around the engine (detokenizing, stop strings, n, chat parsing)."""

import pytest

from glm47.chat import Tokenizer
from glm47.engine.llm_engine import StepOutput
from glm47.sampling_params import SamplingParams
from glm47.llm import LLM

GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def llm(tiny_glm47):
    path = tiny_glm47
    return LLM(path, dtype="float32", kv_cache_tokens=4096)


def test_generate_text_is_the_decoded_tokens(llm):
    out = llm.generate(["Hello there", "Tell me a story"], GREEDY)
    assert [o.index for o in out] == [0, 1]
    for o in out:
        assert o.finish_reason == "length" and len(o.token_ids) == 24
        assert o.text == llm.tokenizer.decode(o.token_ids, skip_special_tokens=True)
        assert o.prompt_token_ids == llm.tokenizer.encode(o.prompt)


def test_stream_deltas_add_up_to_generate(llm):
    whole = llm.generate("Streaming test", GREEDY)[0]
    deltas = list(llm.generate_stream("Streaming test", GREEDY))
    assert "".join(d.text for d in deltas) == whole.text
    assert sum((d.token_ids for d in deltas), []) == whole.token_ids
    assert [d.finish_reason for d in deltas][-1] == "length" and all(d.finish_reason is None for d in deltas[:-1])


def test_stop_string_truncates_text_and_ends_the_request(llm):
    full = llm.generate("Stop strings", GREEDY)[0].text
    cut = len(full) // 2
    stop = full[cut:cut + 3]
    start = full.index(stop)
    out = llm.generate("Stop strings", SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == full[:start]
    kept = llm.generate("Stop strings", SamplingParams(temperature=0, max_tokens=24, stop=stop,
                                                        include_stop_str_in_output=True))[0]
    assert kept.text == full[:start] + stop
    stats = llm.engine.stats()  # the stop string aborted the request: nothing runs, every block is free
    assert stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_kv_blocks


def test_n_samples_are_seeded_and_distinct(llm):
    params = SamplingParams(max_tokens=8, n=3, seed=11)
    a = llm.generate("Sample me", params)[0]
    b = llm.generate("Sample me", params)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3 and a.num_completion_tokens == 24


def test_breaking_out_of_a_stream_frees_the_engine(llm):
    for d in llm.generate_stream(["one", "two"], SamplingParams(max_tokens=50)):
        break
    while llm.engine.has_unfinished():
        llm.engine.step()
    stats = llm.engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_kv_blocks


def test_bad_inputs_are_value_errors(llm):
    with pytest.raises(ValueError, match="exactly one"):
        llm.generate("a", prompt_token_ids=[[1]])
    with pytest.raises(ValueError, match="exceeds"):
        llm.generate("a", SamplingParams(max_tokens=10**6))
    with pytest.raises(ValueError, match="2 sampling_params for 1 prompts"):
        llm.generate("a", [GREEDY, GREEDY])


class ScriptedEngine:
    """Replays a fixed completion text as tokens, one per step, then a stop token: the facade's text work
    (stop-token hiding, parsing) is tested on output a random model would never write."""

    def __init__(self, tokenizer: Tokenizer, text: str, stop_id: int = 151338):
        self.tokens = tokenizer.encode(text, allow_special=True) + [stop_id]
        self.eos_token_ids = frozenset({151329, 151336, 151338})
        self.prompts = []

    def add_request(self, ids, params, request_id=None):
        self.prompts.append(ids)
        self.pos = 0
        return "r0"

    def step(self):
        tok = self.tokens[self.pos]
        self.pos += 1
        done = self.pos == len(self.tokens)
        return [StepOutput("r0", [tok], done, "stop" if done else None)]

    def abort(self, rid):
        return True


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]


def test_chat_parses_reasoning_and_a_tool_call(llm, monkeypatch):
    reply = "Need weather.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>" \
            "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>"
    monkeypatch.setattr(llm, "engine", ScriptedEngine(llm.tokenizer, reply))
    out = llm.chat([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS)
    assert out.reasoning_content == "Need weather." and out.content is None
    assert out.finish_reason == "tool_calls"
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("get_weather", '{"city": "Paris", "days": 3}')]
    prompt = llm.engine.prompts[0]
    assert prompt[-2:] == [llm.tokenizer.token_to_id("<|assistant|>"), llm.tokenizer.think_id]
    assert out.num_completion_tokens == len(llm.engine.tokens)


def test_chat_stream_agrees_with_chat_and_thinking_off_starts_in_content(llm, monkeypatch):
    reply = "Plain answer."
    monkeypatch.setattr(llm, "engine", ScriptedEngine(llm.tokenizer, reply))
    chunks = list(llm.chat_stream([{"role": "user", "content": "hi"}], enable_thinking=False))
    assert "".join(c.delta.content for c in chunks if c.delta and c.delta.content) == "Plain answer."
    assert chunks[-1].finish_reason == "stop" and all(c.delta is None or not c.delta.reasoning_content
                                                      for c in chunks)
    assert llm.engine.prompts[0][-1] == llm.tokenizer.think_end_id  # <|assistant|></think>


def test_chat_stream_of_a_call_cut_before_its_close_sends_no_call_and_agrees_with_chat(llm, monkeypatch):
    """A stop string can end the reply inside a call: the stream never sends it (an agent would run a call
    with half its arguments); its raw text is content and the finish reason stays "stop", as in chat()."""
    reply = "Need weather.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Par"
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    monkeypatch.setattr(llm, "engine", ScriptedEngine(llm.tokenizer, reply))
    chunks = list(llm.chat_stream(messages, tools=TOOLS))
    assert not any(c.delta and c.delta.tool_calls for c in chunks)
    content = "".join(c.delta.content for c in chunks if c.delta and c.delta.content)
    assert content == "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Par"
    assert chunks[-1].finish_reason == "stop"
    monkeypatch.setattr(llm, "engine", ScriptedEngine(llm.tokenizer, reply))
    out = llm.chat(messages, tools=TOOLS)
    assert (out.content, out.tool_calls, out.finish_reason) == (content, [], "stop")


def test_the_package_exports_llm_and_sampling_params_lazily():
    import subprocess
    import sys

    import glm47

    assert glm47.LLM is LLM and glm47.SamplingParams is SamplingParams
    code = "import sys, glm47; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
