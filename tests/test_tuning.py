"""mlxcy.tuning: one process-wide options object with a context manager.
What each knob does is tested where it acts (cache_pad: test_models_parity's
cache tests; cpu_sync: test_generate's block-by-block test)."""
import pytest

import mlxcy
from mlxcy import tuning


def test_defaults_and_snapshot():
    assert tuning.get() == tuning.DEFAULTS
    assert tuning.DEFAULTS._asdict() == {"cpu_sync": True, "cache_pad": 8, "prefill_split": None,
                                         "prefill_chunk_cpu": 128, "prefill_chunk_gpu": 512}
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
])
def test_bad_options_name_the_option_and_change_nothing(options, error, match):
    with pytest.raises(error, match=match):
        tuning.set(**{"prefill_chunk_gpu": 64, **options})   # the good one is not applied either
    assert tuning.get() == tuning.DEFAULTS
    with pytest.raises(error, match=match):
        with tuning.override(**options):
            pass
    assert tuning.get() == tuning.DEFAULTS
