"""mlxcy.chat against transformers' apply_chat_template / render_jinja_template."""
import copy
import json

import pytest

from mlxcy import assets
from mlxcy.chat import ChatTemplate, ChatTemplateError, builtin, read_gguf_metadata

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402
from transformers.utils.chat_template_utils import render_jinja_template  # noqa: E402


def hf_render(template, messages, special=None, **kw):
    """transformers' own rendering of `template` (no tokenizer involved)."""
    kw.setdefault("add_generation_prompt", True)
    out, _ = render_jinja_template(conversations=[copy.deepcopy(messages)],
                                   chat_template=template, **(special or {}), **kw)
    return out[0]


def asset(fn):
    return fn()     # a missing asset skips (tests/conftest.py)


SYSTEM = {"role": "system", "content": "You are terse."}
CONVS = {
    "single": [{"role": "user", "content": "Hello there!"}],
    "system": [SYSTEM, {"role": "user", "content": "What is 2+2?"}],
    "multi": [SYSTEM,
              {"role": "user", "content": "Name a colour."},
              {"role": "assistant", "content": "Blue."},
              {"role": "user", "content": "  Another one, with spaces.  "},
              {"role": "assistant", "content": "Green.", "reasoning_content": "Not blue."},
              {"role": "user", "content": "Unicode: café — 猫 & <tag>"}],
}


# ----------------------------------------------------------------- Qwen3 ----

@pytest.fixture(scope="module")
def qwen3():
    d = asset(assets.qwen3_tokenizer_dir)
    return ChatTemplate.from_tokenizer_config(d), AutoTokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("conv", sorted(CONVS))
@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("thinking", [None, True, False])
def test_qwen3_matches_transformers(qwen3, conv, gen, thinking):
    ours, tok = qwen3
    kw = {} if thinking is None else {"enable_thinking": thinking}
    ref = tok.apply_chat_template(CONVS[conv], tokenize=False, add_generation_prompt=gen, **kw)
    got = ours.render(CONVS[conv], add_generation_prompt=gen, **kw)
    assert got == ref
    if gen and thinking is False:
        assert got.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen3_special_tokens_from_config(qwen3):
    ours, tok = qwen3
    assert ours.special_tokens == tok.special_tokens_map
    cfg = json.loads((assets.qwen3_tokenizer_dir() / "tokenizer_config.json").read_text())
    assert ours.source == cfg["chat_template"]
    assert ChatTemplate.from_tokenizer_config(cfg).render(CONVS["multi"]) == \
        ours.render(CONVS["multi"])


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. Zürich"}},
        "required": ["city"]}}}]
TOOL_CONV = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather",
                                          "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": json.dumps({"temp_c": 21, "sky": "clear"})},
]


def test_qwen3_tools_match_transformers(qwen3):
    ours, tok = qwen3
    for conv in (TOOL_CONV, CONVS["system"]):
        ref = tok.apply_chat_template(conv, tools=TOOLS, tokenize=False,
                                      add_generation_prompt=True)
        got = ours.render(conv, tools=TOOLS)
        assert got == ref
        assert "Zürich" in got and '"get_weather"' in got


def test_qwen3_none_values_dropped_and_continue_final(qwen3):
    ours, tok = qwen3
    conv = [{"role": "user", "content": "Count to three."},
            {"role": "assistant", "content": "One, two,", "tool_calls": None}]
    ref = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=False,
                                  continue_final_message=True)
    got = ours.render(conv, add_generation_prompt=False, continue_final_message=True)
    assert got == ref and got.endswith("One, two,")
    with pytest.raises(ValueError, match="continue_final_message"):
        ours.render(conv, add_generation_prompt=True, continue_final_message=True)


# --------------------------------------------------------------- Llama 3 ----

@pytest.fixture(scope="module")
def llama_tok():
    return AutoTokenizer.from_pretrained(str(asset(assets.llama32_tokenizer_dir)))


@pytest.mark.parametrize("conv", sorted(CONVS))
@pytest.mark.parametrize("gen", [True, False])
def test_llama32_builtin_matches_transformers(llama_tok, conv, gen):
    # This checkpoint's tokenizer_config.json ships no chat_template: use the
    # builtin Llama 3.2 one, with the checkpoint's special tokens.
    ours = ChatTemplate.from_tokenizer_config(assets.llama32_tokenizer_dir(),
                                              fallback="llama3.2")
    assert ours.special_tokens["bos_token"] == "<|begin_of_text|>"
    ref = llama_tok.apply_chat_template(CONVS[conv], chat_template=ours.source, tokenize=False,
                                        add_generation_prompt=gen, date_string="26 Jul 2024")
    got = ours.render(CONVS[conv], add_generation_prompt=gen, date_string="26 Jul 2024")
    assert got == ref
    assert got.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                          "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")


def test_llama32_strftime_now(llama_tok):
    from datetime import datetime
    ours = builtin("llama3.2", bos_token=llama_tok.bos_token)
    before = datetime.now().strftime("%d %b %Y")
    got = ours.render(CONVS["single"])
    ref = llama_tok.apply_chat_template(CONVS["single"], chat_template=ours.source,
                                        tokenize=False, add_generation_prompt=True)
    after = datetime.now().strftime("%d %b %Y")
    assert got == ref or before != after
    assert f"Today Date: {before}" in got or f"Today Date: {after}" in got


def test_llama3_builtin_expected():
    got = builtin("llama3").render(CONVS["system"])
    assert got == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                   "You are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                   "What is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_no_template_without_fallback():
    with pytest.raises(ValueError, match="chat_template"):
        ChatTemplate.from_tokenizer_config(asset(assets.llama32_tokenizer_dir))


# ------------------------------------------------------------------ GGUF ----

def test_smollm2_gguf_template_matches_transformers():
    gguf = pytest.importorskip("gguf")
    path = asset(assets.smollm2_gguf)
    r = gguf.GGUFReader(path)
    f = r.fields["tokenizer.chat_template"]
    src = bytes(f.parts[f.data[0]]).decode("utf-8")
    toks = r.fields["tokenizer.ggml.tokens"]
    bos_id = int(r.fields["tokenizer.ggml.bos_token_id"].parts[-1][0])
    eos_id = int(r.fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
    bos = bytes(toks.parts[toks.data[bos_id]]).decode()
    eos = bytes(toks.parts[toks.data[eos_id]]).decode()

    ours = ChatTemplate.from_gguf(path)
    assert ours.source == src
    assert ours.special_tokens["bos_token"] == bos and ours.special_tokens["eos_token"] == eos
    special = {"bos_token": bos, "eos_token": eos}
    for conv in CONVS.values():
        for gen in (True, False):
            assert ours.render(conv, add_generation_prompt=gen) == \
                hf_render(src, conv, special, add_generation_prompt=gen)
    # no system message: SmolLM2's default one is inserted
    assert ours.render(CONVS["single"]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_qwen25_gguf_tools_match_transformers():
    path = asset(assets.qwen25_gguf)
    ours = ChatTemplate.from_gguf(path)
    assert "<tools>" in ours.source
    for conv in (TOOL_CONV, CONVS["multi"]):
        assert ours.render(conv, tools=TOOLS) == \
            hf_render(ours.source, conv, ours.special_tokens, tools=TOOLS)


def test_gguf_bad_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"NOPE" + b"\0" * 32)
    with pytest.raises(ValueError, match="not a GGUF"):
        read_gguf_metadata(p)


# --------------------------------------------------------------- builtins ----

def test_gemma3_builtin_expected_string():
    conv = [{"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello\n"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": [{"type": "text", "text": "And goodbye?"}]}]
    want = ("<bos><start_of_turn>user\nAnswer in French.\n\nHello<end_of_turn>\n"
            "<start_of_turn>model\nBonjour<end_of_turn>\n"
            "<start_of_turn>user\nAnd goodbye?<end_of_turn>\n"
            "<start_of_turn>model\n")
    g = builtin("gemma3")
    assert g.render(conv) == want
    assert g.render(conv, add_generation_prompt=False) == want[:-len("<start_of_turn>model\n")]
    assert g.render(conv) == hf_render(g.source, conv, g.special_tokens)
    assert builtin("gemma").render([{"role": "user", "content": "Hi"}]) == \
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_gemma3_roles_must_alternate():
    with pytest.raises(ChatTemplateError, match="alternate"):
        builtin("gemma3").render([{"role": "user", "content": "a"},
                                  {"role": "user", "content": "b"}])


def test_chatml_builtin_matches_qwen3_for_plain_chats(qwen3):
    ours, _ = qwen3
    c = builtin("qwen")
    for conv in (CONVS["single"], CONVS["system"]):
        assert c.render(conv) == ours.render(conv)
    assert c.render(CONVS["single"]) == \
        "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n"


def test_unknown_family():
    with pytest.raises(ValueError, match="family"):
        builtin("gpt-9")


# ----------------------------------------------------- environment details ----

@pytest.mark.parametrize("src", [
    "{{ x | tojson }}",
    "{{ x | tojson(indent=2) }}",
    "{{ x | tojson(sort_keys=true, separators=(',', ':')) }}",
    "{{ x | tojson(ensure_ascii=true) }}",
    "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}"
    "{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{% endfor %}{{ ns.n }}|{{ dict(a=1) | tojson }}",
    "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
    "  {% if true %}\n    x\n  {% endif %}\n{{ bos_token }}",
])
def test_environment_matches_transformers(src):
    x = {"b": "<é & '\"'>", "a": [1, 2.5, None, True]}
    conv = CONVS["multi"]
    special = {"bos_token": "<s>"}
    assert ChatTemplate(src, **special).render(conv, x=x) == hf_render(src, conv, special, x=x)


def test_named_templates():
    t = ChatTemplate([{"name": "default", "template": "D{{ messages|length }}"},
                      {"name": "tool_use", "template": "T{{ tools|length }}"}])
    msgs = CONVS["single"]
    assert t.render(msgs) == "D1"
    assert t.render(msgs, tools=TOOLS) == "T1"
    assert t.render(msgs, template_name="default", tools=TOOLS) == "D1"
    with pytest.raises(ValueError, match="template_name"):
        t.render(msgs, template_name="nope")
    cfg = {"chat_template": [{"name": "default", "template": "{{ eos_token }}"}],
           "eos_token": {"content": "</s>", "lstrip": False}}
    assert ChatTemplate.from_tokenizer_config(cfg).render(msgs) == "</s>"


# ------------------------------------------------------------------ errors ----

def test_syntax_error():
    with pytest.raises(ChatTemplateError, match="syntax error at line 2"):
        ChatTemplate("ok\n{% for m in messages %}{{ m.content }")


def test_raise_exception_in_template():
    t = ChatTemplate("{% if messages[0].role != 'user' %}"
                     "{{ raise_exception('first message must be from the user') }}{% endif %}ok")
    assert t.render(CONVS["single"]) == "ok"
    with pytest.raises(ChatTemplateError, match="first message must be from the user"):
        t.render(CONVS["system"])


def test_sandbox_blocks_internals():
    t = ChatTemplate("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        t.render(CONVS["single"])
    with pytest.raises(ChatTemplateError, match="underscore"):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render(CONVS["single"])


def test_bad_arguments():
    t = builtin("chatml")
    with pytest.raises(TypeError, match="messages"):
        t.render("hello")
    with pytest.raises(TypeError, match=r"messages\[1\]"):
        t.render([{"role": "user", "content": "a"}, "b"])
    with pytest.raises(ValueError, match="messages"):
        t.render([])
    with pytest.raises(TypeError, match="tools"):
        t.render(CONVS["single"], tools=[print])
    with pytest.raises(TypeError, match="template"):
        ChatTemplate(42)
    with pytest.raises(FileNotFoundError):
        ChatTemplate.from_tokenizer_config("/nonexistent/dir/tokenizer_config.json")
