"""Prometheus metrics of one server (prometheus_client, its own registry)."""
from __future__ import annotations

import os

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, ProcessCollector, generate_latest)

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
# (engine stats key, metric name, help) of the engine's counters
_ENGINE = (("steps", "engine_steps",
            "Engine steps (one decode of the running batch and/or one prefill chunk each)"),
           ("step_seconds", "engine_step_seconds", "Seconds spent in engine steps"),
           ("prefill_seconds", "engine_prefill_seconds",
            "Seconds of prefill chunks (admitting prompts into the running batch included)"),
           ("decode_seconds", "engine_decode_seconds", "Seconds of decode steps"),
           ("prefill_tokens", "engine_prefill_tokens", "Prompt tokens prefilled (padding included)"),
           ("decode_tokens", "decode_tokens", "Tokens produced by decode steps"),
           ("decode_steps", "decode_steps", "Forwards of the running batch"),
           ("row_steps", "decode_row_steps", "Sequences advanced, summed over decode steps"),
           ("spec_steps", "spec_verify_steps", "Decode steps that verified proposed tokens"),
           ("proposed_tokens", "spec_proposed_tokens", "Tokens proposed (prompt lookup or draft)"),
           ("accepted_tokens", "spec_accepted_tokens", "Proposed tokens the model accepted"))


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)        # process_resident_memory_bytes, cpu seconds ...
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
        # the engine's counters (steps, their time, speculative decoding),
        # summed over the engines this server ran
        self.engine = {key: Counter(f"mlxcy_{name}", doc, registry=r) for key, name, doc in _ENGINE}
        self.worker_seconds = Counter("mlxcy_worker_seconds",
                                      "Seconds the engine thread spent outside engine steps "
                                      "(admitting requests, turning tokens into text, "
                                      "handing them to the streams)", registry=r)
        self.engine_totals = dict.fromkeys(self.engine, 0)
        self.acceptance = Gauge("mlxcy_spec_acceptance_rate",
                                "Proposed tokens accepted / proposed (speculative decoding)",
                                registry=r)
        self.tokens_per_step = Gauge("mlxcy_spec_tokens_per_step",
                                     "Tokens a decoding sequence gained per forward of the "
                                     "running batch (1 without speculative decoding)",
                                     registry=r)
        self.mlx_active = Gauge("mlxcy_mlx_active_memory_bytes",
                                "MLX memory held by arrays (mlxcy.memory.get_active_memory)",
                                registry=r)
        self.mlx_cache = Gauge("mlxcy_mlx_cache_memory_bytes",
                               "MLX memory kept for reuse (mlxcy.memory.get_cache_memory)",
                               registry=r)
        self.rss_trimmed = Gauge("mlxcy_resident_memory_after_trim_bytes",
                                 "Process RSS right after the engine thread's latest heap trim "
                                 "(mlxcy.memory.trim_heap): what the server keeps, without the "
                                 "freed pages that build up between trims", registry=r)

    def heap_trimmed(self):
        """Record the RSS after a heap trim (Linux; elsewhere nothing)."""
        try:
            with open("/proc/self/statm") as f:
                pages = int(f.read().split()[1])
        except OSError:
            return
        self.rss_trimmed.set(pages * os.sysconf("SC_PAGE_SIZE"))

    def add_engine_stats(self, stats: dict, seen: dict) -> dict:
        """Add what an engine's stats counted since `seen` (what they said
        the last time); returns the new `seen`."""
        for key, counter in self.engine.items():
            d = stats.get(key, 0) - seen.get(key, 0)
            if d > 0:
                counter.inc(d)
                self.engine_totals[key] += d
        t = self.engine_totals
        self.acceptance.set(t["accepted_tokens"] / t["proposed_tokens"]
                            if t["proposed_tokens"] else 0.0)
        self.tokens_per_step.set(t["decode_tokens"] / t["row_steps"] if t["row_steps"] else 0.0)
        return {key: stats.get(key, 0) for key in self.engine}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
