"""Fuzzing the server through its own /openapi.json with schemathesis: requests generated from each route's
request-body schema, valid and invalid (wrong types, out-of-range numbers, missing and extra fields), sent to
the real engine on a tiny random checkpoint over a real socket. No answer may be a 5xx, and afterwards the
engine is healthy, serves a request and holds no KV block. Bounded: a fixed number of examples per route
(about 45 s here)."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from server_util import running, wait_idle

from glm47.chat import Tokenizer
from glm47.engine.llm_engine import LLMEngine
from glm47.server.app import create_app
from glm47.server.context import ServerConfig

EXAMPLES = 30  # per route and mode
pytestmark = pytest.mark.slow  # hundreds of requests through the real engine


@pytest.fixture(scope="module")
def served(tiny_glm47):
    path = tiny_glm47
    # A short context keeps fuzzed max_tokens cheap: a generated request runs at most 64 positions.
    engine = LLMEngine.from_path(path, dtype=torch.float32, kv_cache_tokens=1024, max_model_len=64)
    with running(create_app(engine, Tokenizer.default(), ServerConfig())) as url:
        yield url, engine


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
def test_fuzzed_requests_get_no_5xx_and_leave_the_engine_healthy(served, mode):
    url, engine = served
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/messages"}
    failures = []

    for op in operations:
        if mode is schemathesis.GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # nothing to make invalid in a GET without a body
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def call(case):
            response = case.call(base_url=url, timeout=60)
            if response.status_code >= 500:
                failures.append((op.method, op.path, case.body, response.status_code, response.text[:300]))

        call()
    assert not failures, failures[:5]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert wait_idle(url, 5.0) == (0.0, 0.0)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
