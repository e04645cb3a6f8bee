"""Prometheus metrics of one server (prometheus_client, its own registry)."""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("mlxcy_requests", "HTTP requests answered",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mlxcy_prompt_tokens", "Prompt tokens admitted",
                                     registry=r)
        self.generation_tokens = Counter("mlxcy_generation_tokens", "Tokens generated",
                                         registry=r)
        self.sequences = Counter("mlxcy_sequences_finished", "Sequences finished, by reason",
                                 ["reason"], registry=r)
        self.queue_depth = Gauge("mlxcy_queue_depth",
                                 "Sequences waiting for a row in the running batch",
                                 registry=r)
        self.running = Gauge("mlxcy_running_sequences", "Sequences in the running batch",
                             registry=r)
        self.ttft = Histogram("mlxcy_time_to_first_token_seconds",
                              "From a request's arrival to its first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("mlxcy_inter_token_latency_seconds",
                             "Time between consecutive tokens of a sequence",
                             buckets=_ITL_BUCKETS, registry=r)
        self.cache_hits = Counter("mlxcy_prefix_cache_hits", "Prompts that reused a cached prefix",
                                  registry=r)
        self.cache_misses = Counter("mlxcy_prefix_cache_misses",
                                    "Prompts that found no cached prefix", registry=r)
        self.cached_tokens = Counter("mlxcy_prefix_cache_tokens",
                                     "Prompt tokens served from the prefix cache", registry=r)
        self.cache_bytes = Gauge("mlxcy_prefix_cache_bytes", "Bytes held by the prefix cache",
                                 registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
