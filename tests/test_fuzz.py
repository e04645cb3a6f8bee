"""A short, fixed-seed run of the mutation fuzzer (tools/fuzz.py) over each
reader: no case may crash the worker (a signal), hang, or raise anything but
the reader's documented mlxcy.Error class.  The long run is
`python tools/fuzz.py --reader all --seconds 1800 --out DIR`."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import fuzz  # noqa: E402

# cases per reader: a few seconds each on a loaded CPU
CASES = {"safetensors": 80, "gguf": 60, "tokenizer": 50, "chat": 80, "session": 50}


@pytest.mark.parametrize("reader", fuzz.READERS)
def test_short_fuzz_run(reader, tmp_path):
    stats = fuzz.fuzz(reader, cases=CASES[reader], seed=12345, out=tmp_path, timeout=60)
    assert stats["findings"] == [], stats["findings"]
    assert stats["cases"] == CASES[reader]
    # the seeds themselves are valid files, and mutations mostly are not
    assert stats["ok"] >= 1 and stats["clean"] >= CASES[reader] // 4, stats


@pytest.mark.parametrize("reader", fuzz.READERS)
def test_seeds_are_accepted(reader, tmp_path):
    """Every seed reads without error (so mutations start from valid files)."""
    t = fuzz.Targets(tmp_path)
    for k, data in enumerate(fuzz.seeds(reader, tmp_path)):
        p = tmp_path / f"seed{k}{fuzz.SUFFIX[reader]}"
        p.write_bytes(data)
        getattr(t, reader)(p)


def test_mutators_change_their_input():
    import random
    rng = random.Random(0)
    seed = fuzz.tiny_gguf()
    assert sum(fuzz.mutate("gguf", seed, rng) != seed for _ in range(50)) >= 45
    tok = fuzz.tokenizer_seeds()[0]
    assert sum(fuzz.mutate("tokenizer", tok, rng) != tok for _ in range(50)) >= 40


def test_a_crashing_worker_is_reported(tmp_path, monkeypatch):
    """The harness itself: a target that kills its process with SIGSEGV is a
    finding ("crash SIGSEGV"), and the loop carries on with a fresh worker."""
    monkeypatch.setenv("MLXCY_FUZZ_SELFTEST", "1")
    stats = fuzz.fuzz("chat", cases=3, seed=1, out=tmp_path, timeout=60)
    assert stats["findings"] == ["crash SIGSEGV"] * 3, stats
    assert len(list((tmp_path / "crashes" / "chat").glob("*.jinja"))) == 3
