"""The Responses API (POST /v1/responses) through the openai SDK's `client.responses`, whole and streamed, with a
function-tool round trip (input items and previous_response_id); tool results rendered in the order of their
calls on every API; and a 404 that names the route and lists the server's routes."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest
from server_util import AFTER_TOOL, TOOLS, running, script

from glm47.server.app import create_app
from glm47.server.context import ServerConfig
from glm47.server.scripted import ScriptedEngine

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": TOOLS[0]["function"]["parameters"]}


@pytest.fixture(scope="module")
def served(tok):
    engine = ScriptedEngine(tok, script)
    with running(create_app(engine, tok, ServerConfig())) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="x", max_retries=0)


def test_a_whole_response_has_reasoning_and_message_items(client):
    r = client.responses.create(model="glm-4.7", input="SCRIPT:plain", instructions="Be brief.")
    assert r.status == "completed" and r.output_text == "The answer is 4."
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].summary[0].text == "Easy: 2+2."
    assert r.usage.output_tokens > 0 and r.usage.output_tokens_details.reasoning_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_a_streamed_response_sends_the_events_in_order_and_the_same_output(client):
    events = list(client.responses.create(model="glm-4.7", input="SCRIPT:plain", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.reasoning_summary_part.added"]
    assert kinds[-1] == "response.completed" and [e.sequence_number for e in events] == list(range(len(events)))
    compact = [k for i, k in enumerate(kinds) if k != kinds[i - 1] or not k.endswith(".delta")]
    assert compact[4:] == [
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done", "response.output_item.done", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text == final.output_text == "The answer is 4."
    with client.responses.stream(model="glm-4.7", input="SCRIPT:plain") as stream:  # the SDK's own assembly
        assert stream.get_final_response().output_text == "The answer is 4."


def test_a_function_tool_round_trip_with_input_items_and_with_previous_response_id(client, served, tok):
    first = client.responses.create(model="glm-4.7", input="SCRIPT:tool weather?", tools=[WEATHER])
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris", "days": 3}
    assert first.status == "completed" and call.call_id.startswith("call_")
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}
    # the client sends the whole conversation back (store: false), as Codex does
    items = [{"role": "user", "content": "SCRIPT:tool weather?"}] + [o.model_dump() for o in first.output] + [result]
    second = client.responses.create(model="glm-4.7", input=items, tools=[WEATHER], store=False)
    assert second.output_text == AFTER_TOOL.split("</think>")[1]
    prompt = tok.decode(served[1].prompts[-1])
    assert "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>" in prompt
    assert '<tool_response>{"sky": "sunny"}</tool_response>' in prompt
    assert "Need the weather." in prompt  # the reasoning item came back as the turn's reasoning
    chained = client.responses.create(model="glm-4.7", previous_response_id=first.id, input=[result], tools=[WEATHER])
    assert chained.output_text == second.output_text and chained.previous_response_id == first.id


def test_a_streamed_function_call_comes_whole(client):
    events = list(client.responses.create(model="glm-4.7", input="SCRIPT:two", tools=[WEATHER], stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [json.loads(e.arguments) for e in done] == [{"city": "Paris"}, {"city": "Rome"}]
    calls = [item for item in events[-1].response.output if item.type == "function_call"]
    assert [c.arguments for c in calls] == [e.arguments for e in done]


def test_max_output_tokens_makes_an_incomplete_response(client):
    r = client.responses.create(model="glm-4.7", input="SCRIPT:long", max_output_tokens=5)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5


def test_hosted_tools_are_ignored_and_what_cannot_run_is_a_400(client, served):
    r = client.responses.create(model="glm-4.7", input="SCRIPT:plain", tools=[{"type": "web_search"}, WEATHER])
    assert r.status == "completed"
    for body, words in [
            ({"input": "x", "tools": [{"type": "custom", "name": "apply_patch"}]}, "tools of type 'custom'"),
            ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "text-only"),
            ({"input": "x", "previous_response_id": "resp_nope"}, "not found"),
            ({"input": "x", "max_output_tokens": "5"}, "max_output_tokens"),
            ({"input": [{"type": "computer_call"}]}, "not supported")]:
        reply = httpx.post(served[0] + "/v1/responses", json={"model": "glm-4.7", **body})
        assert reply.status_code == 400 and words in reply.json()["error"]["message"], reply.text


def test_parallel_tool_results_are_rendered_in_the_order_of_their_calls(served, tok):
    url, engine = served
    calls = [{"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "A"}'}},
             {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "B"}'}}]
    oai = [{"role": "user", "content": "both"}, {"role": "assistant", "content": None, "tool_calls": calls},
           {"role": "tool", "tool_call_id": "call_b", "content": "result B"},
           {"role": "tool", "tool_call_id": "call_a", "content": "result A"}]
    assert httpx.post(url + "/v1/chat/completions", json={"messages": oai, "tools": TOOLS}).status_code == 200
    chat_prompt = tok.decode(engine.prompts[-1])
    ant = [{"role": "user", "content": "both"},
           {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_a", "name": "get_weather",
                                              "input": {"city": "A"}},
                                             {"type": "tool_use", "id": "toolu_b", "name": "get_weather",
                                              "input": {"city": "B"}}]},
           {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_b", "content": "result B"},
                                        {"type": "tool_result", "tool_use_id": "toolu_a", "content": "result A"}]}]
    anthropic.Anthropic(base_url=url, api_key="x", max_retries=0).messages.create(
        model="glm-4.7", max_tokens=5, messages=ant,
        tools=[{"name": "get_weather", "input_schema": TOOLS[0]["function"]["parameters"]}])
    for prompt in (chat_prompt, tok.decode(engine.prompts[-1])):
        assert prompt.index("result A") < prompt.index("result B"), prompt


def test_an_unknown_route_is_a_404_naming_it_and_the_routes_there_are(served):
    r = httpx.post(served[0] + "/v1/embeddings", json={})
    message = r.json()["error"]["message"]
    assert r.status_code == 404 and "POST /v1/embeddings" in message
    assert "POST /v1/responses" in message and "POST /v1/chat/completions" in message


def test_claude_codes_keep_all_thinking_edit_keeps_earlier_turns_reasoning(served, tok):
    url, engine = served
    msgs = [{"role": "user", "content": "first"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "EARLY REASONING", "signature": "s"},
                                              {"type": "text", "text": "one"}]},
            {"role": "user", "content": "second"}]
    client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)
    client.messages.create(model="glm-4.7", max_tokens=3, messages=msgs)
    assert "EARLY REASONING" not in tok.decode(engine.prompts[-1])  # the default: earlier turns' reasoning dropped
    keep = {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}
    client.messages.create(model="glm-4.7", max_tokens=3, messages=msgs, extra_body={"context_management": keep})
    assert "EARLY REASONING" in tok.decode(engine.prompts[-1])
    counted = client.messages.count_tokens(model="glm-4.7", messages=msgs, extra_body={"context_management": keep})
    assert counted.input_tokens == len(engine.prompts[-1])


def test_anthropic_json_output_is_a_clear_400_until_constrained_decoding(served):
    r = httpx.post(served[0] + "/v1/messages", json={
        "model": "glm-4.7", "max_tokens": 5, "messages": [{"role": "user", "content": "title?"}],
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}})
    assert r.status_code == 400 and r.json()["type"] == "error" and "output_config.format" in r.text


def test_the_function_tools_of_a_namespace_are_offered_and_a_call_carries_its_namespace(tok):
    """Codex 0.171 groups its sub-agent tools in a `namespace` tool."""
    call = "Close it.</think><tool_call>close_agent<arg_key>target</arg_key><arg_value>a1</arg_value></tool_call>"
    engine = ScriptedEngine(tok, call)
    tools = [{"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.", "tools": [
        {"type": "function", "name": "close_agent", "parameters": {
            "type": "object", "properties": {"target": {"type": "string"}}, "required": ["target"]}}]}, WEATHER]
    with running(create_app(engine, tok, ServerConfig())) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.responses.create(model="glm-4.7", input="close a1", tools=tools)
        item = next(o for o in r.output if o.type == "function_call").model_dump()
        assert item["name"] == "close_agent" and item["namespace"] == "multi_agent_v1"
        assert json.loads(item["arguments"]) == {"target": "a1"}
        prompt = tok.decode(engine.prompts[-1])
        assert '"name": "close_agent"' in prompt and '"name": "get_weather"' in prompt
