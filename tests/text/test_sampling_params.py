"""glm47/sampling_params.py: SamplingParams and its errors without torch, GLM-4.7's recommended sampling, and
the context check whose ContextTooLong each API words its own way. (Validation of every field: test_sampling.py.)"""

import subprocess
import sys

import pytest

from glm47.sampling_params import (RECOMMENDED_TEMPERATURE, RECOMMENDED_TOP_P, ContextTooLong, ParamError,
                                   SamplingParams, context_overflow)


def test_sampling_params_and_the_text_side_import_without_torch():
    """A server's request checks and a thin client need no torch: importing them must not load it."""
    code = ("import sys, glm47, glm47.sampling_params, glm47.text; glm47.SamplingParams(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:500]


def test_the_engine_uses_the_same_classes():
    from glm47.engine import sampling

    assert sampling.SamplingParams is SamplingParams and sampling.ParamError is ParamError


def test_recommended_is_glm47s_sampling_with_settings_on_top():
    assert (RECOMMENDED_TEMPERATURE, RECOMMENDED_TOP_P) == (1.0, 0.95)  # the model card's
    p = SamplingParams.recommended(max_tokens=7)
    assert (p.temperature, p.top_p, p.max_tokens) == (1.0, 0.95, 7)
    assert SamplingParams.recommended(temperature=0).greedy


@pytest.mark.parametrize("num_prompt, max_tokens, field", [
    (100, 50, None), (150, 50, None), (199, None, None), (199, 0, None),  # fits (None: at least one token)
    (180, 50, "max_tokens"),  # the prompt fits, the completion does not: shrink max_tokens
    (200, None, "prompt"), (200, 1, "prompt"), (250, 10, "prompt"),  # the prompt alone fills the context
])
def test_context_overflow_names_what_to_shrink(num_prompt, max_tokens, field):
    e = context_overflow(num_prompt, max_tokens, 200)
    if field is None:
        assert e is None
        return
    assert isinstance(e, ContextTooLong) and isinstance(e, ParamError) and e.field == field
    assert (e.num_prompt_tokens, e.max_tokens, e.limit, e.lower_bound) == (num_prompt, max_tokens, 200, False)
    assert "exceeds the context of 200 tokens" in str(e)


def test_context_too_long_carries_the_requests_own_field_names():
    e = context_overflow(180, 50, 200, "input", "max_output_tokens")
    assert e.field == "max_output_tokens" and e.prompt_field == "input"
    assert context_overflow(300, 50, 200, "input", "max_output_tokens").field == "input"
    bound = ContextTooLong(500, None, 200, "messages", lower_bound=True)
    assert bound.field == "messages"
    assert str(bound) == "a prompt of more than 500 tokens exceeds the context of 200 tokens"


def test_each_of_n_samples_is_one_request_with_its_own_seed():
    p = SamplingParams(n=3, seed=2**64 - 2, max_tokens=5)
    seeds = [p.for_sample(k).seed for k in range(3)]
    assert seeds == [2**64 - 2, 2**64 - 1, 0]  # seed + 2 wraps around within 64 bits
    assert all(p.for_sample(k).n == 1 and p.for_sample(k).max_tokens == 5 for k in range(3))
    unseeded = SamplingParams(max_tokens=5)
    assert unseeded.for_sample(0) is unseeded and unseeded.for_sample(4).seed is None
