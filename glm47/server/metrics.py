"""Prometheus metrics of one server, named like vLLM's (`glm47:` instead of `vllm:`), in their own registry
so that several apps in one process (tests) never collide. The engine thread writes them; GET /metrics
renders them. Gauges mirror EngineStats after every engine step; counters and histograms are per token
and per request."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets (seconds): a tiny CPU model answers in milliseconds, a 355B one on a busy node in tens of s.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.num_requests_running = Gauge("glm47:num_requests_running", "Requests in the running batch.",
                                          labels, registry=r).labels(model_name)
        self.num_requests_waiting = Gauge("glm47:num_requests_waiting", "Requests waiting to be scheduled.",
                                          labels, registry=r).labels(model_name)
        self.kv_cache_usage_perc = Gauge("glm47:kv_cache_usage_perc",
                                         "Fraction of KV-cache blocks held by live requests (1 = full).",
                                         labels, registry=r).labels(model_name)
        self.prompt_tokens = Counter("glm47:prompt_tokens", "Prompt tokens of admitted requests.",
                                     labels, registry=r).labels(model_name)
        self.generation_tokens = Counter("glm47:generation_tokens", "Generated tokens.",
                                         labels, registry=r).labels(model_name)
        self.prefix_cache_queries = Counter("glm47:prefix_cache_queries", "Prompt tokens looked up in the "
                                            "prefix cache.", labels, registry=r).labels(model_name)
        self.prefix_cache_hits = Counter("glm47:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                         labels, registry=r).labels(model_name)
        self.num_preemptions = Counter("glm47:num_preemptions", "Requests preempted to free KV blocks.",
                                       labels, registry=r).labels(model_name)
        self.spec_decode_num_draft_tokens = Counter("glm47:spec_decode_num_draft_tokens",
                                                    "MTP draft tokens verified (speculative decoding).",
                                                    labels, registry=r).labels(model_name)
        self.spec_decode_num_accepted_tokens = Counter("glm47:spec_decode_num_accepted_tokens",
                                                       "MTP draft tokens accepted.",
                                                       labels, registry=r).labels(model_name)
        self._success = Counter("glm47:request_success", "Finished requests, by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self._model_name = model_name
        self.time_to_first_token = Histogram("glm47:time_to_first_token_seconds", "Arrival to first token.",
                                             labels, buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.inter_token_latency = Histogram("glm47:inter_token_latency_seconds",
                                             "Time between a request's consecutive token outputs.", labels,
                                             buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e_request_latency = Histogram("glm47:e2e_request_latency_seconds", "Arrival to last token.",
                                             labels, buckets=E2E_BUCKETS, registry=r).labels(model_name)
        # EngineStats counters are cumulative; Prometheus counters only move by increments.
        self._last = {"queries": 0, "hits": 0, "preemptions": 0, "drafts": 0, "accepted": 0}

    def request_finished(self, finish_reason: str) -> None:
        self._success.labels(self._model_name, finish_reason).inc()

    def engine_stats(self, stats) -> None:
        """Copies an EngineStats snapshot (called on the engine thread after each step)."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage_perc.set(stats.kv_usage)
        for key, counter, value in (("queries", self.prefix_cache_queries, stats.prefix_cache_queries),
                                    ("hits", self.prefix_cache_hits, stats.prefix_cache_hits),
                                    ("preemptions", self.num_preemptions, stats.num_preemptions),
                                    ("drafts", self.spec_decode_num_draft_tokens, stats.spec_draft_tokens),
                                    ("accepted", self.spec_decode_num_accepted_tokens, stats.spec_accepted_tokens)):
            if value > self._last[key]:
                counter.inc(value - self._last[key])
            self._last[key] = value

    def render(self) -> bytes:
        return generate_latest(self.registry)
