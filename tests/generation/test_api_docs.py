"""The Python API as an IDE shows it: the generation methods' docstrings list
every GenerationOptions field, classify/batch_generate show their keywords in
their signatures, and mlxcy.assets is an attribute of the package."""
import dataclasses
import inspect
import subprocess
import sys

import pytest

import mlxcy
import subproc
from mlxcy.generation.inference import GenerationOptions, MlxTextModel, TextModel

METHODS = ("generate", "chat", "stream", "stream_chat", "batch_generate")


@pytest.mark.parametrize("cls", [TextModel, MlxTextModel])
@pytest.mark.parametrize("name", METHODS)
def test_generation_docstrings_list_every_option(cls, name):
    doc = inspect.getdoc(getattr(cls, name))
    assert doc, name
    for f in dataclasses.fields(GenerationOptions):
        assert f"    {f.name}=" in doc, (name, f.name)


def test_mlx_lm_backend_docstrings():
    pytest.importorskip("mlx_lm")
    from mlxcy.backends.mlx_lm import MlxLmTextModel as cls
    for name in ("stream", "stream_chat", "generate"):
        doc = inspect.getdoc(getattr(cls, name))
        assert "kv_bits=" in doc and "max_tokens=" in doc, name


@pytest.mark.parametrize("cls", [TextModel, MlxTextModel])
def test_classify_and_batch_signatures(cls):
    p = inspect.signature(cls.classify).parameters
    assert {"labels", "top_k", "return_logits", "batch_size"} <= set(p)
    for k in ("labels", "top_k", "return_logits", "batch_size"):
        assert k in inspect.getdoc(cls.classify)
    p = inspect.signature(cls.batch_generate).parameters
    assert {"options", "batch_size", "opts"} <= set(p)
    # classify's keywords are exactly mlxcy.generation.batch.classify's
    from mlxcy.generation.batch import classify
    assert [k for k in p if k != "opts"] == ["self", "prompts", "options", "batch_size"]
    assert list(inspect.signature(cls.classify).parameters)[1:] == \
        list(inspect.signature(classify).parameters)[1:]


def test_assets_is_an_attribute():
    assert mlxcy.assets.smollm2_gguf is not None
    r = subprocess.run([sys.executable, "-c",
                        "import mlxcy; print(mlxcy.assets.__name__, "
                        "callable(mlxcy.assets.smollm2_gguf))"],
                       capture_output=True, text=True, env=subproc.env(), cwd=subproc.CWD)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["mlxcy.assets", "True"]
