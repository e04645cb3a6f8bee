"""mlxcy.tuning: one process-wide options object with a context manager.
What each knob does is tested where it acts (cache_pad: test_models_parity's
cache tests; cpu_sync: test_generate's block-by-block test)."""
import pytest

import mlxcy
from mlxcy import tuning


def test_defaults_and_snapshot():
    assert tuning.get() == tuning.DEFAULTS
    assert tuning.DEFAULTS._asdict() == {"cpu_sync": True, "cache_pad": 8, "prefill_split": None,
                                         "prefill_chunk_cpu": 128, "prefill_chunk_gpu": 512,
                                         "lookup_chain": False, "lookup_adapt": None}
    assert mlxcy.tuning is tuning


def test_set_returns_previous_and_restores():
    old = tuning.set(cache_pad=0, prefill_split=True)
    try:
        assert old == {"cache_pad": 8, "prefill_split": None}
        now = tuning.get()
        assert (now.cache_pad, now.prefill_split, now.cpu_sync) == (0, True, True)
    finally:
        assert tuning.set(**old) == {"cache_pad": 0, "prefill_split": True}
    assert tuning.get() == tuning.DEFAULTS


def test_override_restores_on_exit_and_on_error():
    with tuning.override(cpu_sync=False, prefill_chunk_gpu=64) as opts:
        assert opts.cpu_sync is False and opts.prefill_chunk_gpu == 64
        with tuning.override(prefill_split=False):
            assert tuning.get().prefill_split is False
            assert tuning.get().cpu_sync is False
        assert tuning.get().prefill_split is None
    assert tuning.get() == tuning.DEFAULTS
    with pytest.raises(KeyError):
        with tuning.override(cache_pad=3):
            raise KeyError("inside")
    assert tuning.get().cache_pad == 8


def test_reset():
    tuning.set(cache_pad=1, cpu_sync=False, prefill_chunk_cpu=7)
    tuning.reset()
    assert tuning.get() == tuning.DEFAULTS


@pytest.mark.parametrize("options,error,match", [
    ({"vector_attention": False}, mlxcy.OptionError, "unknown tuning option 'vector_attention'"),
    ({"cache_pad": -1}, mlxcy.OptionError, "'cache_pad' must be in"),
    ({"prefill_chunk_cpu": 0}, mlxcy.OptionError, "'prefill_chunk_cpu'"),
    ({"cache_pad": 2.0}, mlxcy.OptionTypeError, "'cache_pad' must be an int"),
    ({"cache_pad": True}, mlxcy.OptionTypeError, "'cache_pad' must be an int"),
    ({"cpu_sync": 1}, mlxcy.OptionTypeError, "'cpu_sync' must be a bool"),
    ({"prefill_split": "auto"}, mlxcy.OptionTypeError, "'prefill_split'"),
    ({"lookup_chain": None}, mlxcy.OptionTypeError, "'lookup_chain' must be a bool"),
    ({"lookup_adapt": 1}, mlxcy.OptionTypeError, "'lookup_adapt' must be None"),
])
def test_bad_options_name_the_option_and_change_nothing(options, error, match):
    with pytest.raises(error, match=match):
        tuning.set(**{"prefill_chunk_gpu": 64, **options})   # the good one is not applied either
    assert tuning.get() == tuning.DEFAULTS
    with pytest.raises(error, match=match):
        with tuning.override(**options):
            pass
    assert tuning.get() == tuning.DEFAULTS


def test_engine_reads_the_prefill_knobs(tmp_path):
    """The engine's default chunk follows prefill_chunk_cpu / _gpu, and
    prefill_split picks the prefill plan: forced on, the prompt's last token
    runs as a step of its own (one step more than forced off), with the same
    greedy tokens."""
    import numpy as np
    from tiny_models import VOCAB, make_tiny
    from mlxcy.generation import engine
    from mlxcy.models.load import load_model
    from mlxcy.generation.sample import Sampler
    key = "prefill_chunk_cpu" if mlxcy.default_device().type == "cpu" else "prefill_chunk_gpu"
    assert engine.default_prefill_chunk() == getattr(tuning.DEFAULTS, key)
    with tuning.override(**{key: 7}):
        assert engine.default_prefill_chunk() == 7
    make_tiny("qwen3", tmp_path, tokenizer=False)
    ids = np.random.default_rng(2).integers(0, VOCAB, 40).tolist()
    runs = {}
    with load_model(tmp_path) as m:
        for split in (False, True):
            stats = {}
            with tuning.override(prefill_split=split):
                toks = [ev.token for ev in engine.generate_ids(
                    m, ids, prefill_chunk=16, sampler=Sampler(temperature=0.0), max_tokens=6,
                    stats=stats)]
            runs[split] = toks, stats["steps"]
    assert runs[True][0] == runs[False][0] and len(runs[True][0]) == 6
    assert runs[True][1] == runs[False][1] + 1, runs
