"""Types of mlxcy.generation.engine (engine.pyx): the continuous-batching
generation engine under TextModel, batch_generate and the server."""
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

from mlxcy.core import _ArrayLike
from mlxcy.generation.sample import Sampler
from mlxcy.models.base import Model
from mlxcy.models.cache import Cache

__all__ = ["Engine", "Event", "generate_ids", "check_ids", "default_prefill_chunk",
           "lookup_proposals", "take_cache_rows", "merge_cache_rows"]

DEFAULT_LOOKUP: int

def lookup_proposals(ids: Sequence[int], k: int) -> tuple[list[int], int]:
    """What prompt lookup proposes after `ids` when it may propose up to k
    tokens: (the proposed ids, how many ids the match agrees on, up to 16)."""

def default_prefill_chunk() -> int:
    """Prompt tokens per row per prefill step when the caller does not say."""

class Event:
    """What one step produced for one sequence.

    token: the sampled id, or -1 when the event only ends the sequence;
    finish_reason: None while the sequence runs, else "stop", "length" or
    "cancelled"; cache: on the final event of a sequence added with
    keep_cache=True, its batch-1 Cache (a row of a larger batch: views of
    the batch's buffers until its next write); cached_tokens: on a sequence's first
    token, the prompt tokens taken from the cache given to add()."""

    seq_id: int
    token: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None
    cache: Cache | None
    cached_tokens: int | None
    def __init__(
        self,
        seq_id: int,
        token: int,
        logprob: float | None = None,
        top_logprobs: list[tuple[int, float]] | None = None,
        finish_reason: str | None = None,
        cache: Cache | None = None,
        cached_tokens: int | None = None,
    ) -> None: ...

@disjoint_base
class Engine:
    """Advances a set of sequences together over one model.  All calls must
    come from one thread: MLX's streams are thread-local."""

    def __init__(
        self,
        model: Model,
        max_batch: int = 32,
        prefill_chunk: int | None = None,
        draft_model: Model | None = None,
        num_draft: int = 4,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
    ) -> None: ...
    @property
    def max_batch(self) -> int: ...
    @property
    def stats(self) -> dict[str, int | float]: ...
    @property
    def num_draft(self) -> int: ...
    @property
    def kv_bits(self) -> int | None: ...
    @property
    def kv_group_size(self) -> int: ...
    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    def make_cache(self) -> Cache:
        """An empty cache of the kind this engine uses (see kv_bits)."""
    def add(
        self,
        prompt_ids: Sequence[int] | _ArrayLike,
        sampler: Sampler | None = None,
        max_tokens: int = 256,
        stop_ids: Iterable[int] = (),
        logprobs: bool = False,
        top_logprobs: int = 0,
        history_ids: Sequence[int] | _ArrayLike | None = None,
        cache: Cache | None = None,
        keep_cache: bool = False,
        token_mask: Callable[[list[int]], Any] | None = None,
        prompt_lookup: bool | int | None = None,
    ) -> int:
        """Queue a sequence; returns its id."""
    def cancel(self, seq_id: int) -> None:
        """End a sequence now; unknown or finished ids are ignored."""
    def finish(self, seq_id: int, reason: str = "stop") -> Cache | None:
        """End a sequence now with `reason`; returns its cache with keep_cache=True."""
    def has_work(self) -> bool: ...
    def close(self) -> None:
        """Drop every sequence and array."""
    def step(self) -> list[Event]:
        """Advance every sequence by one step; returns the list of Events."""

def check_ids(ids: Sequence[int] | _ArrayLike, vocab: int, what: str, empty: bool = False) -> npt.NDArray[np.int32]:
    """ids as int32 numpy [T], each in [0, vocab); ValueError naming `what` otherwise."""
def generate_ids(
    model: Model, prompt_ids: Sequence[int] | _ArrayLike, prefill_chunk: int | None = None, **add_kwargs: Any
) -> Iterator[Event]:
    """One sequence on an engine of its own: yields its Events, the last one
    with its finish_reason (add_kwargs are Engine.add's, and stats=<a dict>)."""
def take_cache_rows(cache: Cache, rows: Sequence[int] | _ArrayLike) -> None:
    """Keep the batch rows `rows` (in the order given) of every layer of `cache`."""
def merge_cache_rows(a: Cache, b: Cache, pad_a: int = 0, pad_b: int = 0) -> None:
    """Stack b's batch rows under a's, left-padding a's rows by pad_a positions
    and b's by pad_b (a.offset + pad_a == b.offset + pad_b); b is left empty."""
