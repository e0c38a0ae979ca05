"""mlx_llama.chat_template against Hugging Face transformers and llama.cpp.

* Renderings equal transformers' `apply_chat_template(..., tokenize=False)` for every conversation
  × template in tests/golden/chat_templates.json (SmolLM2's template from its GGUF and the built-in
  chatml, llama-2, llama-3 and zephyr), made by scripts/make_template_goldens.py.
* SmolLM2 renderings tokenized by mlx_llama equal llama.cpp's tokens (stored in the golden file,
  and live when llama_cpp is importable); llama-2/zephyr/llama-3 renderings on llama.cpp's
  SentencePiece and Llama-3 test vocabularies get llama.cpp's chat-mode BOS handling.
* The sandbox, raise_exception, transformers' globals and filters, template selection and its
  errors, end-of-turn markers, double-templating detection and the incremental-prefix property.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from mlx_llama import MlxLlamaError
from mlx_llama.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    ChatTemplateError,
    ChatTemplateSecurityError,
    TemplateRaisedError,
    encode_chat,
    looks_templated,
    special_tokens,
    stop_token_ids,
    template_for,
)
from mlx_llama.gguf_file import GGUFFile
from mlx_llama.tokenizer import Tokenizer

GOLDEN = json.loads((Path(__file__).resolve().parent / "golden" / "chat_templates.json").read_text("utf-8"))
CASES = GOLDEN["cases"]
CONVERSATIONS = {k: v["messages"] for k, v in GOLDEN["conversations"].items()}
SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TEMPLATE_NAMES = sorted(GOLDEN["templates"])  # smollm2 + the built-ins


def golden_template(name: str) -> ChatTemplate:
    t = GOLDEN["templates"][name]
    return ChatTemplate(t["source"], t["tokens"], name=name)


def case_id(c) -> str:
    return f"{c['template']}-{c['conversation']}"


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def S(c):
    return {"role": "system", "content": c}


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_template(smol_gguf) -> ChatTemplate:
    return template_for(smol_gguf.metadata)


# ---------------------------------------------------------------------------------------------
# renderings = transformers
# ---------------------------------------------------------------------------------------------


def test_golden_covers_enough():
    assert len(GOLDEN["templates"]) == 5 and len(CONVERSATIONS) >= 10
    assert len(CASES) == len(GOLDEN["templates"]) * len(CONVERSATIONS)
    assert GOLDEN["transformers_version"]


def test_builtin_sources_are_the_golden_ones():
    """The goldens were made from these exact sources (the script checks them against upstream)."""
    assert sorted(BUILTIN_TEMPLATES) == ["chatml", "llama-2", "llama-3", "zephyr"]
    for name, source in BUILTIN_TEMPLATES.items():
        assert GOLDEN["templates"][name]["source"] == source, name


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_render_equals_transformers(case):
    tmpl = golden_template(case["template"])
    out = tmpl.render(CONVERSATIONS[case["conversation"]], add_generation_prompt=case["add_generation_prompt"])
    assert out == case["expected"]


def test_smollm2_template_from_gguf(smol_gguf, smol_template):
    golden = GOLDEN["templates"]["smollm2"]
    assert smol_template.name == "gguf"
    assert smol_template.source == golden["source"] == smol_gguf.metadata["tokenizer.chat_template"]
    assert smol_template.special_tokens == golden["tokens"]
    assert (smol_template.bos_token, smol_template.eos_token) == ("<|im_start|>", "<|im_end|>")
    for case in CASES:
        if case["template"] == "smollm2":
            msgs = CONVERSATIONS[case["conversation"]]
            assert smol_template.render(msgs, case["add_generation_prompt"]) == case["expected"]


def test_smollm2_default_system_prompt():
    tmpl = golden_template("smollm2")
    out = tmpl.render([U("Hi")])
    assert out == (f"<|im_start|>system\n{SMOL_DEFAULT_SYSTEM}<|im_end|>\n"
                   "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # an explicit system message, even an empty one, replaces it
    assert SMOL_DEFAULT_SYSTEM not in tmpl.render([S("Be brief."), U("Hi")])
    assert tmpl.render([S(""), U("Hi")]).startswith("<|im_start|>system\n<|im_end|>\n")


def test_render_defaults_and_determinism():
    tmpl = golden_template("chatml")
    msgs = CONVERSATIONS["multi_turn"]
    assert tmpl.render(msgs) == tmpl.render(msgs, add_generation_prompt=True) == tmpl(msgs)
    assert tmpl.render(msgs).endswith("<|im_start|>assistant\n")
    assert not tmpl.render(msgs, add_generation_prompt=False).endswith("assistant\n")
    assert len({golden_template("llama-3").render(msgs) for _ in range(5)}) == 1


def test_messages_are_not_modified_and_none_keys_dropped():
    tmpl = ChatTemplate("{% for m in messages %}{{ m.role }}:{{ 'tool_calls' in m }};{% endfor %}")
    msgs = [{"role": "user", "content": "x", "tool_calls": None}]
    assert tmpl.render(msgs) == "user:False;"
    assert msgs == [{"role": "user", "content": "x", "tool_calls": None}]


# ---------------------------------------------------------------------------------------------
# tokens = llama.cpp
# ---------------------------------------------------------------------------------------------

SMOL_CASES = [c for c in CASES if c["template"] == "smollm2"]


@pytest.mark.parametrize("case", SMOL_CASES, ids=case_id)
def test_smollm2_tokens_equal_llama_cpp_golden(case, smol_tokenizer):
    if "llama_cpp_tokens" not in case:
        pytest.skip("golden file made without llama_cpp")
    text = case["expected"]
    assert smol_tokenizer.encode(text, add_special=False, parse_special=True) == case["llama_cpp_tokens"]
    assert not smol_tokenizer.add_bos  # so llama.cpp's chat mode adds nothing either
    assert encode_chat(smol_tokenizer, text) == case["llama_cpp_tokens"]


def test_smollm2_tokens_equal_llama_cpp_live(smollm2_path, smol_tokenizer):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python) is not installed")
    llm = llama_cpp.Llama(str(smollm2_path), vocab_only=True, verbose=False)
    for case in SMOL_CASES:
        text = case["expected"]
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert smol_tokenizer.encode(text, add_special=False, parse_special=True) == theirs, case_id(case)
        assert encode_chat(smol_tokenizer, text) == theirs, case_id(case)
        # llama.cpp's chat mode: the vocabulary's BOS (none here) + the text's tokens
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == theirs


def _vocab(name):
    from test_tokenizer import vocab_path

    path = vocab_path(name)
    return path, GGUFFile(path)


@pytest.mark.parametrize("vocab,names", [("llama-spm", ["llama-2", "zephyr"]), ("llama-bpe", ["llama-3"])])
def test_bos_handling_equals_llama_cpp_chat_mode(vocab, names):
    """llama.cpp's chat mode drops a leading BOS text when the vocabulary adds BOS, then tokenizes
    with BOS added and special tokens parsed: one BOS for templates that write it (llama-2's per-turn
    `<s>` stay), the vocabulary's BOS for those that don't (zephyr)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python) is not installed")
    path, gguf = _vocab(vocab)
    tok = Tokenizer.from_gguf(gguf)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    assert tok.add_bos
    for name in names:
        tmpl = template_for(gguf.metadata, name)
        bos = tmpl.bos_token
        for cid, msgs in CONVERSATIONS.items():
            text = tmpl.render(msgs)
            stripped = text[len(bos):] if text.startswith(bos) else text
            theirs = llm.tokenize(stripped.encode(), add_bos=True, special=True)
            ours = encode_chat(tok, text)
            assert ours == theirs, (name, cid)
            assert ours[0] == tok.bos_id and ours[1] != tok.bos_id, (name, cid)
            if name == "llama-2":
                turns = sum(m["role"] == "user" for m in msgs)
                assert ours.count(tok.bos_id) == turns


def test_encode_chat_bos_logic():
    class Fake:
        add_bos, add_eos, bos_id, eos_id = True, False, 1, 2

        def token_to_piece(self, i, special=False):
            return {1: b"<s>", 2: b"</s>"}[i]

        def encode(self, text, add_special=True, parse_special=False):
            assert parse_special
            return ([1] if add_special and self.add_bos else []) + [text]

    tok = Fake()
    assert encode_chat(tok, "<s>[INST] a [/INST]") == [1, "[INST] a [/INST]"]
    assert encode_chat(tok, "<|user|>\na</s>\n") == [1, "<|user|>\na</s>\n"]
    tok.add_bos = False
    assert encode_chat(tok, "<s>x") == ["<s>x"]


# ---------------------------------------------------------------------------------------------
# environment: transformers' globals, filters, extensions; the sandbox; errors
# ---------------------------------------------------------------------------------------------


def test_raise_exception_gives_dedicated_error():
    tmpl = golden_template("llama-2")
    with pytest.raises(TemplateRaisedError) as e:
        tmpl.render([U("a"), U("b")])
    assert e.value.message == "Conversation roles must alternate user/assistant/user/assistant/..."
    assert isinstance(e.value, ChatTemplateError) and isinstance(e.value, MlxLlamaError)
    assert "llama-2" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TemplateRaisedError) as e:
        ChatTemplate("{% if messages|length > 1 %}{{ raise_exception('only one: ' ~ messages|length) }}{% endif %}ok",
                     name="mine").render([U("a"), A("b")])
    assert e.value.message == "only one: 2" and str(e.value) == "mine: only one: 2"


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ messages.append(1) }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ bos_token.format.__globals__ }}{{ cycler.__init__.__globals__ }}",
    "{% set ns = namespace(_secret=1) %}",
    "{% set ns = namespace(a=1) %}{% set ns._x = 2 %}",
])
def test_sandbox_refuses_unsafe_templates(source):
    import jinja2.exceptions

    tmpl = ChatTemplate(source, {"bos_token": "<s>"}, name="evil")
    with pytest.raises(ChatTemplateSecurityError) as e:
        tmpl.render([U("hi")])
    assert isinstance(e.value, ChatTemplateError) and isinstance(e.value, MlxLlamaError)
    assert isinstance(e.value.__cause__, jinja2.exceptions.SecurityError)
    assert str(e.value).startswith("evil: ")


def test_template_errors_are_chat_template_errors():
    with pytest.raises(ChatTemplateError, match=r"bad: syntax error on line 1"):
        ChatTemplate("{% for m in messages %}", name="bad")
    with pytest.raises(ChatTemplateError, match="rendering failed"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}", name="t").render([U("a")])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ bos_token + 'x' }}").render([U("a")])  # undefined bos_token, as transformers
    with pytest.raises(ChatTemplateError):
        ChatTemplate("")


def test_transformers_environment():
    msgs = [U("héllo <b>&'\"")]
    t = ChatTemplate("{{ messages | tojson }}")
    assert t.render(msgs) == json.dumps(msgs, ensure_ascii=False)  # no HTML escaping, no \u escapes
    t = ChatTemplate("{{ messages[0] | tojson(indent=2) }}|{{ {'b': 1, 'a': [1, 2]} | tojson(sort_keys=True, "
                     "separators=(',', ':')) }}")
    assert t.render(msgs) == json.dumps(msgs[0], ensure_ascii=False, indent=2) + '|{"a":[1,2],"b":1}'
    # strftime_now
    fmt = "%d %b %Y"
    assert ChatTemplate("{{ strftime_now('" + fmt + "') }}").render(msgs) == datetime.now().strftime(fmt)
    # loopcontrols, trim_blocks/lstrip_blocks, dict, namespace, the generation tag
    src = ("{% set ns = namespace(n=0) %}\n"
           "  {% for m in messages %}\n"
           "    {% if loop.index0 == 2 %}{% break %}{% endif %}\n"
           "    {% if m.role == 'system' %}{% continue %}{% endif %}\n"
           "    {% set ns.n = ns.n + 1 %}\n"
           "    {% generation %}[{{ m.content }}]{% endgeneration %}\n"
           "  {% endfor %}\n"
           "{{ ns.n }}{{ dict(a=1) | tojson }}{{ dict.fromkeys(['k']) | tojson }}")
    assert ChatTemplate(src).render([S("s"), U("u"), A("a")]) == '[u]1{"a": 1}{"k": null}'
    # tools and documents are passed (None by default); extra kwargs are visible and override specials
    t = ChatTemplate("{{ tools is none }}{{ documents is none }}|{{ bos_token }}|{{ enable_thinking }}",
                     {"bos_token": "<s>"})
    assert t.render(msgs) == "TrueTrue|<s>|"
    assert t.render(msgs, tools=[{"name": "f"}], bos_token="B", enable_thinking=False) == "FalseTrue|B|False"
    # a trailing newline of the source is dropped (keep_trailing_newline=False)
    assert ChatTemplate("x\n").render(msgs) == "x"


# ---------------------------------------------------------------------------------------------
# choosing a template
# ---------------------------------------------------------------------------------------------


def test_template_for_builtin_names(smol_gguf):
    md = smol_gguf.metadata
    for name, source in BUILTIN_TEMPLATES.items():
        t = template_for(md, name)
        assert (t.name, t.source) == (name, source)
        assert t.special_tokens == special_tokens(md)  # the file's tokens, whatever the template
    assert template_for(md, "llama2").name == "llama-2"
    assert template_for(md, "Llama_3").name == "llama-3"
    assert template_for(md, "ChatML").name == "chatml"


def test_template_for_errors(smol_gguf):
    md = smol_gguf.metadata
    with pytest.raises(ChatTemplateError) as e:
        template_for(md, "vicuna")
    assert "'vicuna'" in str(e.value)
    for name in BUILTIN_TEMPLATES:
        assert name in str(e.value)
    bare = {k: v for k, v in md.items() if k != "tokenizer.chat_template"}
    with pytest.raises(ChatTemplateError, match="--chat-template NAME") as e:
        template_for(bare)
    assert isinstance(e.value, MlxLlamaError) and "chatml" in str(e.value)
    assert template_for(bare, "zephyr").name == "zephyr"


def test_file_named_templates():
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"],
          "tokenizer.chat_template": "{{ bos_token }}default",
          "tokenizer.chat_template.tool_use": "tools{{ eos_token }}"}
    assert special_tokens(md) == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert template_for(md).render([U("x")]) == "<s>default"
    assert template_for(md, "tool_use").render([U("x")]) == "tools</s>"
    with pytest.raises(ChatTemplateError, match="tool_use"):
        template_for(md, "nope")


# ---------------------------------------------------------------------------------------------
# end-of-turn markers, double-templating detection, stop tokens
# ---------------------------------------------------------------------------------------------

EXPECTED_EOT = {"smollm2": ("<|im_end|>",), "chatml": ("<|im_end|>",), "llama-2": ("</s>",),
                "zephyr": ("</s>",), "llama-3": ("<|eot_id|>",)}
EXPECTED_MARKERS = {
    "smollm2": {"<|im_start|>", "<|im_end|>"},
    "chatml": {"<|im_start|>", "<|im_end|>"},
    "llama-2": {"<s>", "[INST]", "[/INST]", "</s>", "<<SYS>>", "<</SYS>>"},
    "zephyr": {"<|system|>", "<|user|>", "<|assistant|>", "</s>"},
    "llama-3": {"<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>system<|end_header_id|>",
                "<|start_header_id|>user<|end_header_id|>", "<|start_header_id|>assistant<|end_header_id|>"},
}
EXPECTED_GEN = {"smollm2": "<|im_start|>assistant\n", "chatml": "<|im_start|>assistant\n", "llama-2": "",
                "zephyr": "<|assistant|>\n", "llama-3": "<|start_header_id|>assistant<|end_header_id|>\n\n"}


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_markers(name):
    tmpl = golden_template(name)
    assert tmpl.end_of_turn == EXPECTED_EOT[name]
    assert set(tmpl.markers) == EXPECTED_MARKERS[name]
    assert tmpl.generation_prompt == EXPECTED_GEN[name]


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_looks_templated(name):
    tmpl = golden_template(name)
    for case in CASES:
        if case["template"] == name:
            assert looks_templated(case["expected"], tmpl), case_id(case)
    for plain in ["The capital of France is", "Write <b>bold</b> & a < b > c", "What's 2+2? 🙂",
                  "def f(x):\n    return [x, {'a': 1}]", "System: you are; User: hi", ""]:
        assert not looks_templated(plain, tmpl), plain
    # a prompt templated by hand for this model, as a user would paste it
    by_hand = tmpl.render([U("hi")]).replace("hi", "hello")
    assert looks_templated(by_hand, tmpl)


def test_looks_templated_across_families():
    chatml, llama2 = golden_template("chatml"), golden_template("llama-2")
    assert looks_templated("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", chatml)
    assert looks_templated("[INST] hi [/INST]", llama2)
    assert not looks_templated("[INST] hi [/INST]", chatml)


def test_stop_token_ids(smol_tokenizer, smol_template):
    ids = stop_token_ids(smol_template, smol_tokenizer)
    assert ids == {smol_tokenizer.encode("<|im_end|>", add_special=False, parse_special=True)[0]} == {2}
    assert ids <= smol_tokenizer.stop_ids


# ---------------------------------------------------------------------------------------------
# incremental chat: the rendering of n messages is a prefix of the rendering of n+1
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_prefix_property(name):
    tmpl = golden_template(name)
    checked = 0
    for cid, msgs in CONVERSATIONS.items():
        for n in range(1, len(msgs)):
            shorter = tmpl.render(msgs[:n], add_generation_prompt=False)
            longer = tmpl.render(msgs[: n + 1], add_generation_prompt=False)
            assert longer.startswith(shorter), (cid, n)
            if msgs[n]["role"] == "assistant":
                assert longer.startswith(tmpl.render(msgs[:n], add_generation_prompt=True)), (cid, n)
            checked += 1
    assert checked > 20


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_generated_reply_is_prefix_of_rerendering(name):
    """What a caller's KV cache holds after a turn — the prompt, the reply as generated and the
    end-of-turn token — is a prefix of the re-rendered conversation, except for llama-2, which
    writes a space before `</s>` that the model does not generate."""
    tmpl = golden_template(name)
    history = [S("Be brief."), U("Ping")]
    reply = "Pong, and more."
    cached = tmpl.render(history) + reply + tmpl.end_of_turn[0]
    rerendered = tmpl.render(history + [A(reply), U("Again")])
    if name == "llama-2":  # the model's reply starts with a space ("▁Pong") but ends right at </s>
        assert not rerendered.startswith(tmpl.render(history) + " " + reply + tmpl.eos_token)
        assert rerendered.startswith(tmpl.render(history) + " " + reply + " " + tmpl.eos_token)
    else:
        assert rerendered.startswith(cached)
