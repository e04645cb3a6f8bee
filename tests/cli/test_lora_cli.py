"""The `mlxcy lora` and `mlxcy fuse` commands end to end on a tiny model:
training writes mlx-lm-layout adapters and reports, the loss falls,
--no-compile trains the same adapters, the fused model's logits equal the
adapted model's, and bad arguments fail with a message naming them."""
import json

import numpy as np
import pytest

from cli_models import TEXT, make_model
from tiny_models import ids_for, rel

from mlxcy.models.load import load_model
from mlxcy.train.adapters import load_adapters
from mlxcy.cli.train import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_cli")
    make_model(root / "model")
    data = root / "data"
    data.mkdir()
    # one phrase repeated: a loss that training visibly lowers
    phrase = TEXT
    for split, n in (("train", 16), ("valid", 4)):
        with open(data / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": phrase}) + "\n")
    return root


def _train(setup, out, *extra):
    return main(["lora", "--model", str(setup / "model"), "--data", str(setup / "data"),
                 "--iters", "8", "--batch-size", "4", "--learning-rate", "1e-2",
                 "--num-layers", "2", "--steps-per-report", "4", "--steps-per-eval", "4",
                 "--val-batches", "1", "--adapter-path", str(out), *extra])


def _val_losses(text):
    return [float(line.split("val loss")[1].split(",")[0])
            for line in text.splitlines() if "val loss" in line]


def test_lora_command_trains_and_writes_adapters(setup, capsys):
    assert _train(setup, setup / "ad") == 0
    out = capsys.readouterr().out
    assert "Trainable parameters" in out and "tokens/s" in out
    val = _val_losses(out)
    assert len(val) == 3 and val[0] > val[1] > val[2] and val[2] < val[0] - 0.1, out
    cfg = json.loads((setup / "ad" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == 2
    assert (setup / "ad" / "adapters.safetensors").is_file()


def test_no_compile_trains_the_same_adapters(setup, capsys):
    assert _train(setup, setup / "ad_nc", "--no-compile") == 0
    if not (setup / "ad" / "adapters.safetensors").is_file():
        assert _train(setup, setup / "ad") == 0
    capsys.readouterr()
    with load_model(setup / "model") as m1, load_model(setup / "model") as m2:
        a = load_adapters(m1, setup / "ad").parameters()
        b = load_adapters(m2, setup / "ad_nc").parameters()
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-4, atol=1e-6)


def test_fuse_command_matches_adapted_model(setup, capsys):
    if not (setup / "ad" / "adapters.safetensors").is_file():
        assert _train(setup, setup / "ad") == 0
    assert main(["fuse", "--model", str(setup / "model"), "--adapter-path", str(setup / "ad"),
                 "--save-path", str(setup / "fused")]) == 0
    assert "Saved fused model" in capsys.readouterr().out
    ids = ids_for(3, batch=1, length=10)     # ids < 96 < the vocabulary
    with load_model(setup / "model") as m, load_model(setup / "fused") as f:
        load_adapters(m, setup / "ad")
        want = m(ids).numpy()
        assert rel(f(ids).numpy(), want) <= 1e-5
    with load_model(setup / "model") as m:
        base = m(ids).numpy()
    assert rel(base, want) > 1e-3        # the adapters changed the logits


@pytest.mark.parametrize("args,msg", [
    (["--keys", "q_proj,bogus_proj"], "bogus_proj"),
    (["--num-layers", "9"], "num_layers 9"),
])
def test_lora_command_bad_arguments(setup, tmp_path, capsys, args, msg):
    assert _train(setup, tmp_path / "x", *args) == 2
    err = capsys.readouterr().err
    assert "mlxcy lora: error" in err and msg in err
    assert not (tmp_path / "x" / "adapters.safetensors").exists()


def test_memory_limit_option_values(setup, tmp_path, capsys):
    from mlxcy.cli.train import _memory_limit
    assert _memory_limit("auto") == "auto" and _memory_limit("off") is None
    assert _memory_limit("1.5") == 1_500_000_000
    for bad in ("lots", "0"):
        with pytest.raises(SystemExit) as e:          # argparse's usage error
            _train(setup, tmp_path / "x", "--memory-limit", bad)
        assert e.value.code == 2 and "--memory-limit" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_lora_command_missing_data(setup, tmp_path, capsys):
    rc = main(["lora", "--model", str(setup / "model"), "--data", str(tmp_path / "nodata"),
               "--iters", "1", "--adapter-path", str(tmp_path / "y")])
    assert rc == 2
    assert "nodata" in capsys.readouterr().err
