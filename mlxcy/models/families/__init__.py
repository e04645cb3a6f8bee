"""The registry of model families: one module here per family, each with its
`SPEC` (an mlxcy.models.spec.ArchSpec).  Adding a family: write its module,
add it to FAMILIES (docs/internals.md, "Adding a model family")."""
from mlxcy.errors import ModelFormatError, GGUFError
from mlxcy.models.families import llama, qwen2, qwen3, gemma3, mistral

__all__ = ["FAMILIES", "SPECS", "MODEL_TYPES", "spec_for", "spec_for_gguf"]

FAMILIES = {m.SPEC.name: m.SPEC for m in (llama, qwen2, qwen3, gemma3, mistral)}
SPECS = tuple(FAMILIES.values())
MODEL_TYPES = {mt: s for s in SPECS for mt in s.model_types}
GGUF_ARCHITECTURES = {a: s for s in SPECS for a in s.gguf_architectures}


def spec_for(model_type):
    """The spec of a config.json model_type (ModelFormatError if unsupported)."""
    s = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if s is None:
        raise ModelFormatError(f"config: unsupported model_type {model_type!r} "
                               f"(supported: {', '.join(sorted(MODEL_TYPES))})")
    return s


def spec_for_gguf(arch, path=None):
    """The spec of a GGUF general.architecture (GGUFError if unsupported)."""
    s = GGUF_ARCHITECTURES.get(arch) if isinstance(arch, str) else None
    if s is None:
        raise GGUFError(f"{path}: unsupported GGUF architecture {arch!r} "
                        f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    return s
