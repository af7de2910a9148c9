"""pcbedge.runtime.chat_template renders a checkpoint's chat template exactly as transformers'
``apply_chat_template`` does and finds it with transformers' file precedence.

The module is loaded by file path, so these tests run whether or not pcbedge/runtime/ has its
package init yet; the comparisons with transformers skip where it is not installed.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pcbedge.errors import ModelError, QuestionError
from pcbedge.families.qwen_vl import templates

REPO = Path(__file__).resolve().parents[1]
MODULE_PATH = REPO / "pcbedge" / "runtime" / "chat_template.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("pcbedge_chat_template_under_test", MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ct = _load_module()


@pytest.fixture(scope="module")
def hf_tok():
    """A transformers fast tokenizer around the tiny Qwen-like tokenizer (no downloads)."""
    transformers = pytest.importorskip("transformers")
    from pcbedge.families.qwen_vl.testing import tiny_qwen_tokenizer

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tiny_qwen_tokenizer(), eos_token="<|im_end|>",
        pad_token="<|endoftext|>")


def _hf_render(hf_tok, template, messages, **kwargs):
    hf_tok.chat_template = template
    return hf_tok.apply_chat_template(messages, tokenize=False, **kwargs)


def _ours(hf_tok, template, messages, **kwargs):
    # transformers passes the tokenizer's special tokens as template variables; so do we
    return ct.render_chat(template, messages, **{**hf_tok.special_tokens_map, **kwargs})


ASSISTANT_REPLY = {"role": "assistant", "content": '{"defects": []}'}
CASES = {
    "one image": dict(messages=ct.vision_messages("where are the defects?", 1)),
    "two images": dict(messages=ct.vision_messages("where are the defects?", 2)),
    "no system, text only": dict(messages=ct.vision_messages("how many shorts?", 0)),
    "custom system": dict(messages=ct.vision_messages("where?", 2, system="You inspect PCBs.")),
    "no generation prompt": dict(messages=ct.vision_messages("where?", 1),
                                 add_generation_prompt=False),
    "string content, multi-turn": dict(messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        ASSISTANT_REPLY, {"role": "user", "content": "again"}]),
}


@pytest.mark.parametrize("template", ["QWEN2_VL_TEMPLATE", "NO_SYSTEM_TEMPLATE"])
@pytest.mark.parametrize("case", list(CASES))
def test_render_matches_transformers(hf_tok, template, case):
    template, kwargs = getattr(templates, template), dict(CASES[case])
    messages = kwargs.pop("messages")
    kwargs.setdefault("add_generation_prompt", True)
    expected = _hf_render(hf_tok, template, messages, **kwargs)
    assert _ours(hf_tok, template, messages, **kwargs) == expected
    assert expected.count("<|image_pad|>") == sum(
        p.get("type") == "image" for m in messages if isinstance(m["content"], list)
        for p in m["content"])
    assert expected.endswith("<|im_start|>assistant\n") == kwargs["add_generation_prompt"]


def test_qwen2_vl_add_vision_id_matches_transformers(hf_tok):
    messages = ct.vision_messages("compare", 2)
    expected = _hf_render(hf_tok, templates.QWEN2_VL_TEMPLATE, messages, add_generation_prompt=True,
                          add_vision_id=True)
    assert _ours(hf_tok, templates.QWEN2_VL_TEMPLATE, messages, add_vision_id=True) == expected
    assert "Picture 1: <|vision_start|>" in expected and "Picture 2: " in expected


def test_qwen2_vl_exact_prompt_and_default_system():
    prompt = ct.render_chat(templates.QWEN2_VL_TEMPLATE, ct.vision_messages("where?", 1))
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                      "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>where?"
                      "<|im_end|>\n<|im_start|>assistant\n")
    custom = ct.render_chat(templates.QWEN2_VL_TEMPLATE, ct.vision_messages("where?", 1, system="S."))
    assert custom.startswith("<|im_start|>system\nS.<|im_end|>\n")
    assert "helpful assistant" not in custom


def test_no_system_template_renders_only_a_given_system_prompt():
    plain = ct.render_chat(templates.NO_SYSTEM_TEMPLATE, ct.vision_messages("where?", 2))
    assert plain == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                     "<|vision_start|><|image_pad|><|vision_end|>where?<|im_end|>\n"
                     "<|im_start|>assistant\n")
    custom = ct.render_chat(templates.NO_SYSTEM_TEMPLATE,
                            ct.vision_messages("where?", 2, system="You inspect PCBs."))
    assert custom.startswith("<|im_start|>system\nYou inspect PCBs.<|im_end|>\n<|im_start|>user")


FEATURES = {  # each exercises one piece of transformers' Jinja environment
    "tojson": "{{ messages | tojson }}|{{ messages | tojson(indent=2, sort_keys=True) }}",
    "special tokens": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}"
                      "{% endfor %}{{ pad_token }}",
    "loopcontrols": "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                    "{{ m['content'] }}{% endfor %}",
    "generation block": "{% for m in messages %}{% if m['role'] == 'assistant' %}"
                        "{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}"
                        "{{ m['content'] }}{% endif %}\n{% endfor %}",
    "strftime_now": "{{ strftime_now('%Y') }}",
    "tools and documents": "{{ tools is none }}{{ documents is none }}",
    "trim and lstrip": "{% for m in messages %}\n    {% if true %}\n{{ m['role'] }}\n"
                       "    {% endif %}\n{% endfor %}",
}


@pytest.mark.parametrize("name", list(FEATURES))
def test_environment_matches_transformers(hf_tok, name):
    messages = [{"role": "user", "content": 'a <b> & "c" é'}, ASSISTANT_REPLY]
    expected = _hf_render(hf_tok, FEATURES[name], messages, add_generation_prompt=False)
    assert _ours(hf_tok, FEATURES[name], messages, add_generation_prompt=False) == expected


RAISING = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start"
           " with a user message') }}{% endif %}{% for m in messages %}{{ m['content'] }}"
           "{% endfor %}")


def test_raise_exception_is_a_question_error(hf_tok):
    messages = [ASSISTANT_REPLY]
    with pytest.raises(Exception, match="must start with a user message") as hf_error:
        _hf_render(hf_tok, RAISING, messages)
    assert type(hf_error.value).__name__ == "TemplateError"
    with pytest.raises(QuestionError, match="must start with a user message") as ours:
        ct.render_chat(RAISING, messages)
    assert ours.value.fix
    assert ct.render_chat(RAISING, [{"role": "user", "content": "ok"}]) == "ok"


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{{ m['content'] }}",          # syntax: unclosed for
    "{% generation %}x",                                  # syntax: unclosed generation
    "{{ messages[0]['content'] + 1 }}",                   # TypeError while rendering
    "{{ messages.append(1) }}",                           # the sandbox forbids mutation
])
def test_broken_template_is_a_model_error(template):
    with pytest.raises(ModelError) as e:
        ct.render_chat(template, [{"role": "user", "content": "x"}])
    assert e.value.fix


def test_bad_arguments():
    with pytest.raises(QuestionError):
        ct.render_chat(templates.QWEN2_VL_TEMPLATE, {"role": "user", "content": "x"})
    with pytest.raises(ModelError):
        ct.render_chat(None, [])
    with pytest.raises(TypeError, match="continue_final_message"):
        ct.render_chat(templates.QWEN2_VL_TEMPLATE, [], continue_final_message=True)
    for bad in (-1, 1.5, True):
        with pytest.raises(QuestionError):
            ct.vision_messages("q", bad)
    with pytest.raises(QuestionError):
        ct.vision_messages(None, 1)


def test_vision_messages_layout():
    assert ct.vision_messages("q", 2, system="s") == [
        {"role": "system", "content": [{"type": "text", "text": "s"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                     {"type": "text", "text": "q"}]}]
    assert ct.vision_messages("q", 0) == [{"role": "user",
                                           "content": [{"type": "text", "text": "q"}]}]


def test_compiled_templates_are_cached():
    template = "{{ messages | length }}-cache-probe"
    ct.render_chat(template, [])
    hits = ct._compile.cache_info().hits
    assert ct.render_chat(template, [{"role": "user", "content": "x"}]) == "1-cache-probe"
    assert ct._compile.cache_info().hits == hits + 1


# -- finding the template ----------------------------------------------------------------------

TEXTS = {"json": "JSON {{ messages | length }}", "jinja": "JINJA {{ messages | length }}",
         "processor": "PROC {{ messages | length }}", "tokenizer": "TOK {{ messages | length }}"}


def _write(folder: Path, kinds, tokenizer_template=None) -> None:
    """The checkpoint files of ``kinds`` with the TEXTS templates (tokenizer_config.json is always
    written, with a template only when "tokenizer" is among ``kinds``)."""
    if "json" in kinds:
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": TEXTS["json"]}))
    if "jinja" in kinds:
        (folder / "chat_template.jinja").write_text(TEXTS["jinja"])
    if "processor" in kinds:
        (folder / "processor_config.json").write_text(json.dumps(
            {"processor_class": "Qwen2VLProcessor", "chat_template": TEXTS["processor"]}))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>"}
    if "tokenizer" in kinds:
        config["chat_template"] = tokenizer_template or TEXTS["tokenizer"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _transformers_choice(folder: Path) -> str | None:
    """The template transformers 4.57 would prompt a VLM with: the processor's (as
    ProcessorMixin.get_processor_dict resolves it) or else the tokenizer's."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    processor_dict, _ = ProcessorMixin.get_processor_dict(str(folder), local_files_only=True)
    if processor_dict.get("chat_template") is not None:
        return processor_dict["chat_template"]
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return None if tok.chat_template is None else tok.get_chat_template()


KIND_SETS = [c for n in range(5) for c in itertools.combinations(TEXTS, n)]


@pytest.mark.parametrize("kinds", KIND_SETS, ids=lambda k: "+".join(k) or "none")
def test_find_precedence_matches_transformers(tmp_path, hf_tok, kinds):
    hf_tok.chat_template = None
    hf_tok.save_pretrained(tmp_path)  # tokenizer.json; no template is saved
    _write(tmp_path, kinds)
    found = ct.find_chat_template(tmp_path)
    expected = _transformers_choice(tmp_path)
    assert (found and found[0]) == expected
    if kinds:  # and the order is the documented one
        first = next(k for k in TEXTS if k in kinds)
        assert found[0] == TEXTS[first]


def test_find_without_transformers_on_every_kind(tmp_path):
    assert ct.find_chat_template(tmp_path) is None
    _write(tmp_path, ["tokenizer"])
    assert ct.find_chat_template(tmp_path) == (
        TEXTS["tokenizer"], f"{tmp_path / 'tokenizer_config.json'} [chat_template]")
    _write(tmp_path, ["jinja"])
    assert ct.find_chat_template(tmp_path) == (TEXTS["jinja"],
                                               str(tmp_path / "chat_template.jinja"))
    _write(tmp_path, ["json"])
    assert ct.find_chat_template(tmp_path)[0] == TEXTS["json"]


def test_find_tokenizer_config_template_list_picks_default(tmp_path, hf_tok):
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "D"}]
    hf_tok.chat_template = None
    hf_tok.save_pretrained(tmp_path)
    _write(tmp_path, ["tokenizer"], tokenizer_template=templates)
    assert ct.find_chat_template(tmp_path)[0] == "D" == _transformers_choice(tmp_path)


def test_find_what_save_pretrained_writes(tmp_path, hf_tok):
    hf_tok.chat_template = templates.QWEN2_VL_TEMPLATE
    hf_tok.save_pretrained(tmp_path)  # 4.57 writes chat_template.jinja
    assert (tmp_path / "chat_template.jinja").is_file()
    template, source = ct.find_chat_template(tmp_path)
    assert template == templates.QWEN2_VL_TEMPLATE and source.endswith("chat_template.jinja")
    legacy = tmp_path / "legacy"
    hf_tok.save_pretrained(legacy, save_jinja_files=False)  # the older tokenizer_config.json way
    assert not (legacy / "chat_template.jinja").exists()
    assert ct.find_chat_template(legacy)[0] == templates.QWEN2_VL_TEMPLATE
    import transformers

    reloaded = transformers.PreTrainedTokenizerFast.from_pretrained(legacy)
    messages = ct.vision_messages("where?", 2)
    assert ct.render_chat(template, messages, **reloaded.special_tokens_map) == \
        reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name,content,match", [
    ("chat_template.json", "{not json", "not valid JSON"),
    ("chat_template.json", "[1, 2]", "JSON list"),
    ("chat_template.json", '{"template": "x"}', "no 'chat_template' key"),
    ("chat_template.json", '{"chat_template": 5}', "int"),
    ("chat_template.json", '{"chat_template": null}', "NoneType"),
    ("chat_template.jinja", "  \n", "not Jinja text"),
    ("chat_template.jinja", b"\xff\xfe{{ x }}", "cannot read"),
    ("processor_config.json", '{"chat_template": ["x"]}', "list"),
    ("tokenizer_config.json", '{"chat_template": ', "not valid JSON"),
    ("tokenizer_config.json", '{"chat_template": {"tool_use": "x"}}', "none is named"),
    ("tokenizer_config.json", '{"chat_template": true}', "bool"),
    ("tokenizer_config.json", '{"chat_template": [{"name": "a", "template": "x"}]}',
     "none is named 'default'"),
    ("tokenizer_config.json", '{"chat_template": [{"name": "default", "template": 3}]}',
     "not Jinja text"),
])
def test_malformed_files_are_model_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ModelError, match=match) as e:
        ct.find_chat_template(tmp_path)
    assert name in str(e.value) and e.value.fix


def test_missing_folder_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        ct.find_chat_template(tmp_path / "nope")


def test_import_and_use_without_torch_or_transformers(tmp_path):
    (tmp_path / "chat_template.jinja").write_text(templates.QWEN2_VL_TEMPLATE)
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ct', {str(MODULE_PATH)!r})\n"
        "ct = importlib.util.module_from_spec(spec); spec.loader.exec_module(ct)\n"
        f"template, _ = ct.find_chat_template({str(tmp_path)!r})\n"
        "assert '<|image_pad|>' in ct.render_chat(template, ct.vision_messages('q', 1))\n"
        "print('HEAVY:' + ','.join(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY:"
