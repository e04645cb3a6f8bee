"""Bad inputs for tests/test_hostile.py: each case builds a hostile file (or
call) in a fresh folder and runs the mlxcy entry point that must refuse it.

CASES maps a name to (function(folder), expected exception class name, a
regex the message must match -- the file, key, field, tensor or argument at
fault).  Run as `python tests/hostile_cases.py --worker`, this module reads
case names on stdin and answers one JSON line each, so test_hostile.py runs
them in a separate process: a signal ends that process, not pytest.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import fuzz  # noqa: E402  (tools/fuzz.py: the seed builders)

CASES: dict = {}


def case(expected, pattern):
    def deco(fn):
        CASES[fn.__name__] = (fn, expected, pattern)
        return fn
    return deco


def write(d: Path, name: str, data) -> Path:
    p = d / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


def folder(d: Path, name: str, files: dict) -> Path:
    """Folder d/name holding files {file name: text or bytes}."""
    f = d / name
    f.mkdir()
    for n, data in files.items():
        write(f, n, data)
    return f


def st_raw(header: dict, data=b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def load_st(p):
    from mlxcy import io, transforms
    arrays, _ = io.load_safetensors(p)
    transforms.eval(list(arrays.values()))


def load_gguf_io(p):
    from mlxcy import io, transforms
    arrays, _ = io.load_gguf(p)
    transforms.eval(list(arrays.values()))


def load_model(p):
    from mlxcy.models.load import load_model as lm
    lm(p).close()


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

# ------------------------------------------------------------ safetensors --


@case("ModelFormatError", r"huge\.safetensors.*'x'")
def st_shape_2_32_squared(d):
    load_st(write(d, "huge.safetensors",
                  st_raw({"x": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}})))


@case("ModelFormatError", r"neg\.safetensors.*'x'")
def st_shape_negative_after_int32(d):
    load_st(write(d, "neg.safetensors",
                  st_raw({"x": {"dtype": "F32", "shape": [2**31, 2**31, 4], "data_offsets": [0, 0]}})))


@case("ModelFormatError", r"len\.safetensors.*header length")
def st_header_longer_than_file(d):
    load_st(write(d, "len.safetensors", struct.pack("<Q", 1000) + b"{}"))


@case("ModelFormatError", r"len2\.safetensors.*header length")
def st_header_length_2_63(d):
    load_st(write(d, "len2.safetensors", struct.pack("<Q", 2**63) + b"{}" * 10))


@case("ModelFormatError", r"tiny\.safetensors")
def st_shorter_than_8_bytes(d):
    load_st(write(d, "tiny.safetensors", b"\x02\0\0"))


@case("ModelFormatError", r"empty\.safetensors")
def st_empty_file(d):
    load_st(write(d, "empty.safetensors", b""))


@case("ModelFormatError", r"nojson\.safetensors.*JSON")
def st_header_not_json(d):
    load_st(write(d, "nojson.safetensors", struct.pack("<Q", 6) + b"{nope}"))


@case("ModelFormatError", r"list\.safetensors.*object")
def st_header_is_a_list(d):
    load_st(write(d, "list.safetensors", st_raw([1, 2])))


@case("ModelFormatError", r"utf\.safetensors.*UTF-8")
def st_header_not_utf8(d):
    load_st(write(d, "utf.safetensors", struct.pack("<Q", 4) + b"\xff\xfe{}"))


@case("ModelFormatError", r"f64\.safetensors.*'w'.*F64")
def st_dtype_f64(d):
    load_st(write(d, "f64.safetensors", st_raw({"w": {"dtype": "F64", "shape": [1],
                                                       "data_offsets": [0, 8]}}, b"\0" * 8)))


@case("ModelFormatError", r"q4\.safetensors.*'w'.*Q4")
def st_dtype_unknown(d):
    load_st(write(d, "q4.safetensors", st_raw({"w": {"dtype": "Q4", "shape": [2],
                                                      "data_offsets": [0, 1]}}, b"\0")))


@case("ModelFormatError", r"negdim\.safetensors.*'w'.*-2")
def st_negative_dimension(d):
    load_st(write(d, "negdim.safetensors", st_raw({"w": {"dtype": "F32", "shape": [-2, -2],
                                                          "data_offsets": [0, 16]}}, b"\0" * 16)))


@case("ModelFormatError", r"fdim\.safetensors.*'w'")
def st_float_dimension(d):
    load_st(write(d, "fdim.safetensors", st_raw({"w": {"dtype": "F32", "shape": [2.0],
                                                        "data_offsets": [0, 8]}}, b"\0" * 8)))


@case("ModelFormatError", r"past\.safetensors.*'w'.*outside")
def st_offsets_past_the_end(d):
    load_st(write(d, "past.safetensors", st_raw({"w": {"dtype": "F32", "shape": [4],
                                                        "data_offsets": [0, 16]}}, b"\0" * 8)))


@case("ModelFormatError", r"rev\.safetensors.*'w'")
def st_offsets_reversed(d):
    load_st(write(d, "rev.safetensors", st_raw({"w": {"dtype": "F32", "shape": [0],
                                                       "data_offsets": [8, 0]}}, b"\0" * 8)))


@case("ModelFormatError", r"size\.safetensors.*'w'.*needs 16")
def st_offsets_disagree_with_shape(d):
    load_st(write(d, "size.safetensors", st_raw({"w": {"dtype": "F32", "shape": [4],
                                                        "data_offsets": [0, 8]}}, b"\0" * 16)))


@case("ModelFormatError", r"overlap\.safetensors.*overlap")
def st_overlapping_tensors(d):
    load_st(write(d, "overlap.safetensors", st_raw({"a": F32x2, "b": {
        "dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)))


@case("ModelFormatError", r"dup\.safetensors.*duplicate key 'a'")
def st_duplicate_tensor_name(d):
    h = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, ' \
        b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    load_st(write(d, "dup.safetensors", struct.pack("<Q", len(h)) + h + b"\0" * 8))


@case("ModelFormatError", r"meta\.safetensors.*__metadata__")
def st_metadata_not_strings(d):
    load_st(write(d, "meta.safetensors", st_raw({"__metadata__": {"k": 5}, "a": F32x2}, b"\0" * 8)))


@case("ModelFormatError", r"nooff\.safetensors.*'a'.*data_offsets")
def st_missing_offsets(d):
    load_st(write(d, "nooff.safetensors", st_raw({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8)))


@case("ModelFormatError", r"noshape\.safetensors.*'a'.*shape")
def st_shape_not_a_list(d):
    load_st(write(d, "noshape.safetensors", st_raw({"a": {"dtype": "F32", "shape": "2",
                                                          "data_offsets": [0, 8]}}, b"\0" * 8)))


@case("LoadError", r"model\.safetensors.*'x'")
def st_in_a_model_dir(d):
    m = fuzz.tiny_model_dir(d / "m")
    (m / "model.safetensors").write_bytes(st_raw({"x": {"dtype": "F32", "shape": [2**32, 2**32],
                                                        "data_offsets": [0, 0]}}))
    load_model(m)


# ------------------------------------------------------------------- GGUF --

def gguf_header(n_tensors=0, n_kv=0, version=3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def kv(key, vtype, payload) -> bytes:
    return fuzz._gstr(key) + struct.pack("<I", vtype) + payload


def tensor_info(name, dims, ttype, off) -> bytes:
    return fuzz._gstr(name) + struct.pack("<I", len(dims)) + struct.pack(
        f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ttype, off)


def one_tensor_gguf(dims, ttype, off=0, data=b"\0" * 64, meta=b"", n_kv=0) -> bytes:
    head = gguf_header(1, n_kv) + meta + tensor_info("w", dims, ttype, off)
    head += b"\0" * (-len(head) % 32)
    return head + data


def tiny_gguf(**meta) -> bytes:
    return fuzz.tiny_gguf(meta_overrides=meta)


@case("GGUFError", r"magic\.gguf.*not a GGUF")
def gguf_bad_magic(d):
    load_gguf_io(write(d, "magic.gguf", b"GGUX" + b"\0" * 60))


@case("GGUFError", r"v1\.gguf.*version 1")
def gguf_version_1(d):
    load_gguf_io(write(d, "v1.gguf", gguf_header(version=1) + b"\0" * 40))


@case("GGUFError", r"v99\.gguf.*version 99")
def gguf_version_99(d):
    load_gguf_io(write(d, "v99.gguf", gguf_header(version=99) + b"\0" * 40))


@case("GGUFError", r"ntensors\.gguf.*cannot fit")
def gguf_tensor_count_2_63(d):
    load_gguf_io(write(d, "ntensors.gguf", gguf_header(2**63, 0) + b"\0" * 40))


@case("GGUFError", r"nkv\.gguf.*cannot fit")
def gguf_key_count_huge(d):
    load_gguf_io(write(d, "nkv.gguf", gguf_header(0, 2**40) + b"\0" * 40))


@case("GGUFError", r"strlen\.gguf.*truncated.*metadata key")
def gguf_string_length_huge(d):
    load_gguf_io(write(d, "strlen.gguf", gguf_header(0, 1) + struct.pack("<Q", 2**62) + b"a" * 40))


@case("GGUFError", r"arrlen\.gguf.*'a'")
def gguf_array_count_huge(d):
    load_gguf_io(write(d, "arrlen.gguf", gguf_header(0, 1) + kv(
        "a", 9, struct.pack("<IQ", 4, 2**61)) + b"\0" * 40))


@case("GGUFError", r"vtype\.gguf.*'a'.*value type 77")
def gguf_unknown_value_type(d):
    load_gguf_io(write(d, "vtype.gguf", gguf_header(0, 1) + kv("a", 77, b"\0" * 16)))


@case("GGUFError", r"etype\.gguf.*'a'.*element type 55")
def gguf_unknown_array_element_type(d):
    load_gguf_io(write(d, "etype.gguf", gguf_header(0, 1) + kv(
        "a", 9, struct.pack("<IQ", 55, 2)) + b"\0" * 16))


@case("GGUFError", r"trunc\.gguf.*truncated")
def gguf_truncated_metadata(d):
    data = fuzz.tiny_gguf()
    load_gguf_io(write(d, "trunc.gguf", data[:1200]))


@case("GGUFError", r"align0\.gguf.*general\.alignment")
def gguf_alignment_zero(d):
    load_model(write(d, "align0.gguf", tiny_gguf(**{"general.alignment": 0})))


@case("GGUFError", r"align3\.gguf.*general\.alignment")
def gguf_alignment_three(d):
    load_gguf_io(write(d, "align3.gguf", tiny_gguf(**{"general.alignment": 3})))


@case("GGUFError", r"alignstr\.gguf.*general\.alignment")
def gguf_alignment_string(d):
    load_gguf_io(write(d, "alignstr.gguf", tiny_gguf(**{"general.alignment": "32"})))


@case("GGUFError", r"ndim0\.gguf.*'w'.*0 dimensions")
def gguf_zero_dimensions(d):
    load_gguf_io(write(d, "ndim0.gguf", one_tensor_gguf([], 0)))


@case("GGUFError", r"ndim9\.gguf.*'w'.*9 dimensions")
def gguf_nine_dimensions(d):
    load_gguf_io(write(d, "ndim9.gguf", one_tensor_gguf([1] * 9, 0)))


@case("GGUFError", r"dim0\.gguf.*'w'.*dimensions")
def gguf_zero_sized_dimension(d):
    load_gguf_io(write(d, "dim0.gguf", one_tensor_gguf([4, 0], 0)))


@case("GGUFError", r"bigdim\.gguf.*'w'")
def gguf_dimension_2_40(d):
    load_gguf_io(write(d, "bigdim.gguf", one_tensor_gguf([2**40, 2**40], 0)))


@case("GGUFError", r"type4\.gguf.*'w'")
def gguf_retired_type_4_sigfpe(d):
    load_gguf_io(write(d, "type4.gguf", one_tensor_gguf([32], 4)))


@case("GGUFError", r"type99\.gguf.*'w'.*type 99")
def gguf_unknown_tensor_type(d):
    load_gguf_io(write(d, "type99.gguf", one_tensor_gguf([32], 99)))


@case("GGUFError", r"q5\.gguf.*'w'.*Q5_0")
def gguf_type_mlx_cannot_read(d):
    load_gguf_io(write(d, "q5.gguf", one_tensor_gguf([32], 6, data=b"\0" * 64)))


@case("GGUFError", r"offeof\.gguf.*'w'.*truncated")
def gguf_tensor_past_the_end(d):
    load_gguf_io(write(d, "offeof.gguf", one_tensor_gguf([16], 0, off=2**20)))


@case("GGUFError", r"unaligned\.gguf.*'w'.*alignment")
def gguf_tensor_offset_unaligned(d):
    load_gguf_io(write(d, "unaligned.gguf", one_tensor_gguf([4], 0, off=4)))


@case("GGUFError", r"block\.gguf.*'w'.*Q8_0 block")
def gguf_row_not_whole_blocks(d):
    load_gguf_io(write(d, "block.gguf", one_tensor_gguf([33], 8, data=b"\0" * 80)))


@case("GGUFError", r"tover\.gguf.*overlap")
def gguf_overlapping_tensors(d):
    head = gguf_header(2, 0) + tensor_info("a", [8], 0, 0) + tensor_info("b", [8], 0, 0)
    head += b"\0" * (-len(head) % 32)
    load_gguf_io(write(d, "tover.gguf", head + b"\0" * 64))


@case("GGUFError", r"dupkey\.gguf.*'a'.*twice")
def gguf_duplicate_key(d):
    load_gguf_io(write(d, "dupkey.gguf", gguf_header(0, 2) + kv("a", 4, b"\1\0\0\0") * 2))


@case("GGUFError", r"duptensor\.gguf.*'a'.*twice")
def gguf_duplicate_tensor(d):
    head = gguf_header(2, 0) + tensor_info("a", [8], 0, 0) + tensor_info("a", [8], 0, 32)
    head += b"\0" * (-len(head) % 32)
    load_gguf_io(write(d, "duptensor.gguf", head + b"\0" * 64))


@case("GGUFError", r"blocks\.gguf.*llama\.block_count")
def gguf_block_count_4294967295(d):
    load_model(write(d, "blocks.gguf", tiny_gguf(**{"llama.block_count": 4294967295})))


@case("GGUFError", r"blocks3\.gguf.*llama\.block_count.*blocks 0\.\.1")
def gguf_block_count_more_than_tensors(d):
    load_model(write(d, "blocks3.gguf", tiny_gguf(**{"llama.block_count": 3})))


@case("GGUFError", r"emb\.gguf.*embedding_length")
def gguf_embedding_length_mismatch(d):
    load_model(write(d, "emb.gguf", tiny_gguf(**{"llama.embedding_length": 48})))


@case("GGUFError", r"heads0\.gguf.*llama\.attention\.head_count")
def gguf_head_count_zero(d):
    load_model(write(d, "heads0.gguf", tiny_gguf(**{"llama.attention.head_count": 0})))


@case("GGUFError", r"kv3\.gguf.*head_count_kv")
def gguf_kv_heads_not_dividing(d):
    load_model(write(d, "kv3.gguf", tiny_gguf(**{"llama.attention.head_count": 2,
                                                 "llama.attention.head_count_kv": 3})))


@case("GGUFError", r"eps\.gguf.*layer_norm_rms_epsilon")
def gguf_eps_is_a_string(d):
    load_model(write(d, "eps.gguf", tiny_gguf(**{"llama.attention.layer_norm_rms_epsilon": "x"})))


@case("TokenizerError", r"toks\.gguf.*tokenizer\.ggml\.tokens")
def gguf_tokenizer_tokens_not_strings(d):
    from mlxcy.tokenizer import Tokenizer
    Tokenizer.from_gguf(write(d, "toks.gguf", tiny_gguf(**{"tokenizer.ggml.tokens": [1, 2, 3]})))


@case("ChatTemplateError", r"tmpl\.gguf.*tokenizer\.chat_template")
def gguf_chat_template_not_a_string(d):
    from mlxcy.chat import ChatTemplate
    ChatTemplate.from_gguf(write(d, "tmpl.gguf", tiny_gguf(**{"tokenizer.chat_template": 7})))


# -------------------------------------------------------------------- .npy --

def npy_with_header(d, name, header: str, data=b"\0" * 64):
    """A version 1.0 .npy file with this header dict (padded as numpy pads it)."""
    h = header.ljust(((len(header) + 11 + 63) // 64) * 64 - 11) + "\n"
    p = write(d, name, b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h.encode() + data)
    from mlxcy import io, transforms
    transforms.eval(io.load_npy(p))


@case("ModelFormatError", r"big\.npy: shape \(4294967296, 1\) has a dimension outside")
def npy_dimension_past_int32(d):   # MLX's std::stoi: an IndexError naming nothing
    npy_with_header(d, "big.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 1), }")


@case("ModelFormatError", r"short\.npy: the header's shape \(30, 4\) of <f4 needs 480 bytes")
def npy_data_shorter_than_its_shape(d):
    npy_with_header(d, "short.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (30, 4), }")


@case("ModelFormatError", r"obj\.npy: dtype \|O is not one MLX reads")
def npy_object_dtype(d):
    npy_with_header(d, "obj.npy", "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }")


@case("ModelFormatError", r"tuple\.npy: not a \.npy file MLX can read")
def npy_header_not_a_dict(d):
    npy_with_header(d, "tuple.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4, }")


# -------------------------------------------------------------- tokenizer --

def tok_seed() -> dict:
    return json.loads(fuzz.tokenizer_seeds()[0])


def load_tok(p):
    from mlxcy.tokenizer import Tokenizer
    Tokenizer.from_file(p)      # at load, not at the first encode


@case("TokenizerError", r"regex\.json.*Regex")
def tok_invalid_pretokenizer_regex(d):
    t = tok_seed()
    t["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {"Regex": "(?<"}
    load_tok(write(d, "regex.json", json.dumps(t)))


@case("TokenizerError", r"normregex\.json.*Regex")
def tok_invalid_normalizer_regex(d):
    t = tok_seed()
    t["normalizer"] = {"type": "Replace", "pattern": {"Regex": "[a-"}, "content": "x"}
    load_tok(write(d, "normregex.json", json.dumps(t)))


@case("TokenizerError", r"vocabid\.json.*model\.vocab")
def tok_vocab_id_is_a_string(d):
    t = tok_seed()
    t["model"]["vocab"]["a"] = "1"
    load_tok(write(d, "vocabid.json", json.dumps(t)))


@case("TokenizerError", r"vocabbig\.json.*model\.vocab")
def tok_vocab_id_2_40(d):
    t = tok_seed()
    t["model"]["vocab"]["a"] = 2**40
    load_tok(write(d, "vocabbig.json", json.dumps(t)))


@case("TokenizerError", r"merges\.json.*model\.merges")
def tok_merges_not_a_list(d):
    t = tok_seed()
    t["model"]["merges"] = 5
    load_tok(write(d, "merges.json", json.dumps(t)))


@case("TokenizerError", r"added\.json.*added_tokens\[0\]")
def tok_added_token_without_id(d):
    t = tok_seed()
    del t["added_tokens"][0]["id"]
    load_tok(write(d, "added.json", json.dumps(t)))


@case("TokenizerError", r"pretok\.json.*pre_tokenizer")
def tok_pretokenizer_not_an_object(d):
    t = tok_seed()
    t["pre_tokenizer"] = ["ByteLevel"]
    load_tok(write(d, "pretok.json", json.dumps(t)))


@case("TokenizerError", r"cut\.json.*JSON")
def tok_truncated_json(d):
    load_tok(write(d, "cut.json", json.dumps(tok_seed())[:500]))


@case("TokenizerError", r"latin\.json.*UTF-8")
def tok_not_utf8(d):
    load_tok(write(d, "latin.json", b'{"model": "\xe9"}'))


@case("TokenizerError", r"nomodel\.json.*model")
def tok_no_model_section(d):
    t = tok_seed()
    del t["model"]
    load_tok(write(d, "nomodel.json", json.dumps(t)))


# ----------------------------------------------------------- chat template --

MSGS = [{"role": "user", "content": "hi"}]


def render(src):
    from mlxcy.chat import ChatTemplate
    ChatTemplate(src).render(MSGS)


@case("ChatTemplateError", r"recursed too deeply")
def chat_recursive_macro(d):
    render("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}")


@case("ChatTemplateError", r"recursed too deeply")
def chat_mutually_recursive_macros(d):
    render("{% macro a() %}{{ b() }}{% endmacro %}{% macro b() %}{{ a() }}{% endmacro %}{{ a() }}")


@case("ChatTemplateError", r"syntax error at line 1")
def chat_syntax_error(d):
    render("{% for m in messages %}{{ m }")


@case("ChatTemplateError", r"roles must alternate")
def chat_raise_exception(d):
    render("{{ raise_exception('roles must alternate') }}")


@case("ChatTemplateError", r"ZeroDivisionError")
def chat_division_by_zero(d):
    render("{{ 1 / 0 }}")


@case("ChatTemplateError", r"nested too deeply|syntax error")
def chat_deeply_nested_expression(d):
    render("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}")


@case("ChatTemplateError", r"too large")
def chat_huge_power(d):
    render("{{ 7 ** 999999999 }}")      # minutes of CPU without the bound


@case("ChatTemplateError", r"too large")
def chat_huge_string_repeat(d):
    render("{{ 'ab' * 10 ** 12 }}")     # a MemoryError (after swapping) without the bound


def template_dir(d, config, template_json=None):
    from mlxcy.chat import ChatTemplate
    files = {"tokenizer_config.json": config}
    if template_json is not None:
        files["chat_template.json"] = template_json
    ChatTemplate.from_tokenizer_config(folder(d, "tok", files))


@case("ChatTemplateError", r"tokenizer_config\.json: invalid JSON")
def chat_config_not_json(d):
    template_dir(d, '{"chat_template": ')


@case("ChatTemplateError", r"tokenizer_config\.json: invalid JSON")
def chat_config_not_utf8(d):
    template_dir(d, b'{"chat_template": "\xff\xfe"}')


@case("ChatTemplateError", r"tokenizer_config\.json: expected a JSON object, got list")
def chat_config_a_list(d):
    template_dir(d, '["{{ messages }}"]')


@case("ChatTemplateError", r"chat_template\.json: key 'chat_template' must be a string, got NoneType")
def chat_template_json_without_the_key(d):
    template_dir(d, '{}', '{"template": "{{ messages }}"}')


# -------------------------------------------------------- training data --

def load_jsonl(p):
    from mlxcy.train.data import load_jsonl as lj
    lj(p)


@case("DataError", r"train\.jsonl:2.*UTF-8")
def data_not_utf8(d):
    load_jsonl(write(d, "train.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n'))


@case("DataError", r"bad\.jsonl:1.*JSON")
def data_invalid_json_line(d):
    load_jsonl(write(d, "bad.jsonl", '{"text": \n'))


DEEP_JSON = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"   # past the recursion limit


@case("DataError", r"deep\.jsonl:1: invalid JSON: nested too deeply")
def data_nested_too_deeply(d):
    load_jsonl(write(d, "deep.jsonl", DEEP_JSON + "\n"))


@case("LoadError", r"config\.json: invalid JSON")
def config_nested_too_deeply(d):
    from mlxcy.models.load import load_model as lm
    lm(folder(d, "model", {"config.json": DEEP_JSON}))


@case("TokenizerError", r"deep\.json: JSON nested too deeply")
def tokenizer_json_nested_too_deeply(d):
    from mlxcy.tokenizer import Tokenizer
    Tokenizer.from_file(write(d, "deep.json", DEEP_JSON))


@case("DataError", r"list\.jsonl:1.*object")
def data_line_not_an_object(d):
    load_jsonl(write(d, "list.jsonl", '[1, 2]\n'))


# --------------------------------------------------- adapters and resuming --

def adapter_dir(d, config):
    from mlxcy.train.adapters import CONFIG_FILE, read_adapter_config
    read_adapter_config(folder(d, "adapters", {CONFIG_FILE: config}))


@case("AdapterError", r"adapter_config\.json: expected a JSON object, got list")
def adapter_config_a_list(d):
    adapter_dir(d, "[1, 2]")


@case("AdapterError", r"adapter_config\.json: invalid JSON")
def adapter_config_not_utf8(d):
    adapter_dir(d, b'{"num_layers": "\xff"}')


def training_state(d, meta, tensors=None):
    """_load_state (train(..., resume=True)) on a folder holding `meta` as
    training_state.json, and `tensors` as training_state.safetensors."""
    from mlxcy.train.trainer import _load_state
    write(d, "training_state.json", meta)
    if tensors is not None:
        from mlxcy import io, ops
        io.save_safetensors(str(d / "training_state.safetensors"),
                            {k: ops.zeros([2]) for k in tensors})
    _load_state(d, None)


@case("AdapterError", r"training_state\.json: invalid JSON")
def resume_state_not_json(d):
    training_state(d, '{"iteration": ')


@case("AdapterError", r"training_state\.json: 'n' must be an int >= 0, got '2'")
def resume_state_count_a_string(d):
    training_state(d, '{"iteration": 3, "optimizer_step": 3, "n": "2"}')


@case("AdapterError", r"training_state\.json: 'iteration' must be an int >= 0, got None")
def resume_state_without_iteration(d):
    training_state(d, '{"optimizer_step": 3, "n": 0}')


@case("AdapterError", r"training_state\.safetensors: no tensor 'm\.1'.*n = 2")
def resume_state_missing_a_moment(d):
    training_state(d, '{"iteration": 3, "optimizer_step": 3, "n": 2}', ["m.0", "v.0", "v.1"])


# ----------------------------------------------------------------- sessions --

def session_file(d: Path, name: str, edit) -> Path:
    """A session saved for the tiny model, its metadata edited by `edit(meta)`."""
    data = fuzz.session_seeds(d)[0]
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header["__metadata__"], header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return write(d, name, struct.pack("<Q", len(h)) + h + data[8 + n:])


def load_session(p):
    from mlxcy.generation.cache_io import load_cache
    from mlxcy.models.load import load_model as lm
    model = lm(p.parent / "tiny_model")
    load_cache(p, model)


def _set_layer(meta, key, value):
    layers = json.loads(meta["layers"])
    layers[0][key] = value
    meta["layers"] = json.dumps(layers)


@case("SessionError", r"json\.safetensors.*'layers'.*JSON")
def session_metadata_not_json(d):
    load_session(session_file(d, "json.safetensors", lambda m, h: m.update(layers="[{")))


@case("SessionError", r"offset\.safetensors.*layer 0.*offset")
def session_offset_edited(d):
    load_session(session_file(d, "offset.safetensors", lambda m, h: _set_layer(m, "offset", 10**6)))


@case("SessionError", r"ids\.safetensors.*offset.*token ids")
def session_ids_edited(d):
    load_session(session_file(d, "ids.safetensors", lambda m, h: m.update(ids="[1]")))


@case("SessionError", r"badid\.safetensors.*ids\[0\]")
def session_id_outside_vocabulary(d):
    load_session(session_file(d, "badid.safetensors", lambda m, h: m.update(
        ids=json.dumps([10**6] + json.loads(m["ids"])[1:]))))


@case("SessionError", r"window\.safetensors.*window")
def session_window_mismatch(d):
    load_session(session_file(d, "window.safetensors", lambda m, h: _set_layer(m, "window", 4)))


@case("SessionError", r"kvq\.safetensors.*'kv_quantization'.*not valid JSON")
def session_kv_quantization_not_json(d):
    load_session(session_file(d, "kvq.safetensors", lambda m, h: m.update(kv_quantization="nu|l")))


@case("SessionError", r"kvqtype\.safetensors.*'kv_quantization'.*JSON list or null, not dict")
def session_kv_quantization_an_object(d):
    load_session(session_file(d, "kvqtype.safetensors",
                              lambda m, h: m.update(kv_quantization='{"bits": 4}')))


@case("SessionError", r"kvqfloat\.safetensors.*'kv_quantization' \[4\.0, 64\].*two ints")
def session_kv_quantization_floats(d):
    load_session(session_file(d, "kvqfloat.safetensors",
                              lambda m, h: m.update(kv_quantization="[4.0, 64]")))


@case("SessionError", r"kvqbits\.safetensors.*'kv_quantization' \[7, 64\].*kv_bits must be")
def session_kv_quantization_bits(d):
    load_session(session_file(d, "kvqbits.safetensors",
                              lambda m, h: m.update(kv_quantization="[7, 64]")))


@case("SessionError", r"deep\.json: not a saved chat")
def chat_save_nested_too_deeply(d):
    from mlxcy.cli.commands import ChatState
    ChatState().load(write(d, "deep.json", DEEP_JSON))


@case("SessionError", r"nolayers\.safetensors.*'layers'.*missing")
def session_layers_missing(d):
    load_session(session_file(d, "nolayers.safetensors", lambda m, h: m.pop("layers")))


@case("SessionError", r"notcache\.safetensors.*not an mlxcy cache")
def session_not_a_cache_file(d):
    load_session(session_file(d, "notcache.safetensors", lambda m, h: m.pop("mlxcy.cache")))


@case("SessionError", r"shape\.safetensors.*layer 0.*keys")
def session_keys_shape_edited(d):
    def edit(m, h):
        k = h["0.keys"]
        k["shape"] = [k["shape"][0], k["shape"][1], k["shape"][2] * k["shape"][3], 1]
    load_session(session_file(d, "shape.safetensors", edit))


# ------------------------------------------------------------------ options --

def options(**kw):
    from mlxcy.generation.inference import GenerationOptions
    GenerationOptions.from_kwargs(kw)


def tiny_text_model(d):
    import mlxcy
    return mlxcy.load(write(d, "tiny.gguf", fuzz.tiny_gguf()))


@case("OptionTypeError", r"max_tokens.*str")
def opt_generate_max_tokens_string(d):
    with tiny_text_model(d) as m:
        m.generate("hi", max_tokens="8")


@case("OptionTypeError", r"stop.*int")
def opt_generate_stop_int(d):
    with tiny_text_model(d) as m:
        m.generate("hi", stop=5, max_tokens=2)


@case("OptionError", r"temperature")
def opt_negative_temperature(d):
    options(temperature=-0.5)


@case("OptionError", r"top_p")
def opt_top_p_zero(d):
    options(top_p=0.0)


@case("OptionError", r"top_p")
def opt_top_p_above_one(d):
    options(top_p=1.5)


@case("OptionError", r"min_p")
def opt_min_p_above_one(d):
    options(min_p=2)


@case("OptionError", r"repetition_penalty")
def opt_repetition_penalty_zero(d):
    options(repetition_penalty=0)


@case("OptionError", r"seed")
def opt_negative_seed(d):
    options(seed=-1)


@case("OptionTypeError", r"logit_bias")
def opt_logit_bias_list(d):
    options(logit_bias=[1])


@case("OptionTypeError", r"temprature")
def opt_unknown_option(d):
    options(temprature=0.5)


@case("OptionError", r"temperature.*finite")
def opt_nan_temperature(d):
    options(temperature=float("nan"))


@case("OptionTypeError", r"temperature")
def sampler_temperature_string(d):
    from mlxcy.generation.sample import Sampler
    Sampler(temperature="hot")


@case("OptionError", r"top_k")
def sampler_negative_top_k(d):
    from mlxcy.generation.sample import Sampler
    Sampler(top_k=-1)


# ------------------------------------------------------------------- arrays --

@case("IndexError", r"index 1000000 is out of bounds for axis 0 with size 3")
def array_index_array_out_of_range(d):
    import mlxcy
    mlxcy.array([1.0, 2.0, 3.0])[mlxcy.array([100, 10**6])].numpy()


@case("IndexError", r"take: index 7 is out of bounds")
def array_take_out_of_range(d):
    import mlxcy
    mlxcy.take(mlxcy.array([1.0, 2.0, 3.0]), mlxcy.array([7])).numpy()


@case("IndexError", r"index -9 is out of bounds")
def array_negative_index_array_out_of_range(d):
    import mlxcy
    mlxcy.array([1.0, 2.0, 3.0])[[-9]].numpy()


@case("IndexError", r"index 5 is out of bounds for axis 0")
def array_scatter_out_of_range(d):
    import mlxcy
    x = mlxcy.zeros((3,))
    x[mlxcy.array([5])] = 1.0
    x.numpy()


@case("IndexError", r"integer type")
def array_float_index_array(d):
    import mlxcy
    mlxcy.array([1.0, 2.0])[mlxcy.array([0.5])].numpy()


@case("MemoryError", r"eval: an output of 1099511627776 bytes")
def array_1tib_eval_method(d):
    import mlxcy
    mlxcy.zeros((1 << 20, 1 << 20), mlxcy.uint8).eval()


@case("MemoryError", r"numpy: an output of 1099511627776 bytes")
def array_1tib_numpy(d):
    import mlxcy
    mlxcy.zeros((1 << 20, 1 << 20), mlxcy.uint8).numpy()


@case("ValueError", r"shape.*64-bit count")
def array_shape_overflowing_int64(d):
    import mlxcy
    mlxcy.zeros((65536, 65536, 65536, 65536))


@case("ValueError", r"shape.*64-bit count")
def array_reshape_wrapping_to_zero(d):
    import mlxcy
    mlxcy.reshape(mlxcy.zeros((0,)), (65536, 65536, 65536, 65536))


@case("ValueError", r"shape.*int32")
def array_dimension_past_int32(d):
    import mlxcy
    mlxcy.ones((2**31,))


# ------------------------------------------------------------------- writes --

@case("ValueError", r"half\.safetensors|float64")
def write_failure_leaves_no_file(d):
    import mlxcy
    from mlxcy import io
    try:
        io.save_safetensors(d / "half.safetensors", {"x": mlxcy.array([1.0], dtype=mlxcy.float64)})
    except (RuntimeError, ValueError) as e:
        left = sorted(os.listdir(d))
        if left:
            raise AssertionError(f"files left behind: {left}") from None
        raise ValueError(str(e)) from None


# ------------------------------------------ regressions found by tools/fuzz.py --

def _renamed_tensor_gguf(old, new) -> bytes:
    data = fuzz.tiny_gguf(True, blocks=1)
    a, b = fuzz._gstr(old), fuzz._gstr(new)
    assert len(a) == len(b) and data.count(a) == 1
    return data.replace(a, b)


@case("ModelFormatError", r"renamed\.gguf.*(blk\.0\.ffn_gate|layers\.0\.mlp\.gate_proj)")
def fuzz_quantized_weight_renamed(d):
    # a mangled name left MLX's <prefix>.scales without its weight: KeyError
    load_model(write(d, "renamed.gguf", _renamed_tensor_gguf("blk.0.ffn_gate.weight",
                                                             b"blk.0.ffn_gate.we\xff\x03\x00\x00")))


def _tok_edit(d, name, edit):
    t = tok_seed()
    edit(t)
    load_tok(write(d, name, json.dumps(t)))


@case("TokenizerError", r"repl\.json.*Replace normalizer.*'content'")
def fuzz_tok_replace_content_not_a_string(d):
    _tok_edit(d, "repl.json", lambda t: t.update(normalizer={
        "type": "Replace", "pattern": {"String": " "}, "content": 5}))


@case("TokenizerError", r"prep\.json.*Prepend normalizer.*'prepend'")
def fuzz_tok_prepend_not_a_string(d):
    _tok_edit(d, "prep.json", lambda t: t.update(normalizer={"type": "Prepend",
                                                              "prepend": ["x"]}))


@case("TokenizerError", r"meta\.json.*Metaspace pre-tokenizer.*'replacement'")
def fuzz_tok_metaspace_replacement_not_a_string(d):
    _tok_edit(d, "meta.json", lambda t: t.update(pre_tokenizer={"type": "Metaspace",
                                                                 "replacement": {}}))


@case("TokenizerError", r"dec\.json.*Replace decoder.*'content'")
def fuzz_tok_decoder_replace_content_float(d):
    _tok_edit(d, "dec.json", lambda t: t.update(decoder={
        "type": "Replace", "pattern": {"String": "x"}, "content": 1.5}))


@case("TokenizerError", r"unk\.json.*unk_token")
def fuzz_tok_unk_token_a_dict(d):
    _tok_edit(d, "unk.json", lambda t: t["model"].update(unk_token={"a": 1}))


@case("TokenizerError", r"post\.json.*post_processor.*261")
def fuzz_tok_post_processor_id_outside_vocabulary(d):
    def edit(t):
        t["added_tokens"] = []          # the template's <|endoftext|> id 261 is gone
    _tok_edit(d, "post.json", edit)


@case("ChatTemplateError", r"failed to compile.*break")
def fuzz_chat_break_outside_loop(d):
    render("{% break %}")


# ------------------------------------------- config.json (the spec helper's) --

def config_case(d, **fields):
    m = fuzz.tiny_model_dir(d / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(fields)
    (m / "config.json").write_text(json.dumps(cfg))
    load_model(m)


CONFIG_CASES = {
    "cfg_hidden_size_string": ({"hidden_size": "64"}, r"config\.json.*hidden_size"),
    "cfg_layers_null": ({"num_hidden_layers": None}, r"config\.json.*num_hidden_layers"),
    "cfg_heads_zero": ({"num_attention_heads": 0}, r"config\.json.*num_attention_heads"),
    "cfg_vocab_zero": ({"vocab_size": 0}, r"config\.json.*vocab_size"),
    "cfg_ffn_negative": ({"intermediate_size": -128}, r"config\.json.*intermediate_size"),
    "cfg_heads_not_dividing": ({"num_attention_heads": 3, "head_dim": None},
                               r"config\.json.*num_attention_heads"),
    "cfg_kv_not_dividing": ({"num_key_value_heads": 3}, r"config\.json.*num_key_value_heads"),
    "cfg_layers_10_8": ({"num_hidden_layers": 10**8}, r"config\.json.*num_hidden_layers"),
}
for _name, (_fields, _pat) in CONFIG_CASES.items():
    CASES[_name] = ((lambda f: lambda d: config_case(d, **f))(_fields), "ModelFormatError", _pat)


# ------------------------------------------------------------------- worker --

def run_case(name: str) -> dict:
    fn, _, _ = CASES[name]
    with tempfile.TemporaryDirectory(prefix="mlxcy-hostile-") as tmp:
        try:
            fn(Path(tmp))
        except BaseException as e:          # noqa: BLE001 -- reported to the test
            return {"raised": [c.__name__ for c in type(e).__mro__], "msg": str(e),
                    "tb": traceback.format_exc()[-1500:]}
    return {"raised": None, "msg": "", "tb": ""}


def worker():
    sys.setrecursionlimit(3000)
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(run_case(line.strip())), flush=True)


if __name__ == "__main__":
    sys.path.append(str(ROOT))      # a fallback only: PYTHONPATH names the mlxcy under test
    worker()
