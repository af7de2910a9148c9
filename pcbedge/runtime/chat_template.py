"""A checkpoint's own chat template, found and rendered the way transformers 4.57 does it.

A fine-tuned VLM is prompted correctly only with the template it was trained with (its system
turn, image placeholders, generation header). On the edge device there is no transformers, so
this module reads the template from the checkpoint folder and renders it with jinja2 configured
exactly like ``transformers.utils.chat_template_utils._compile_jinja_template``. It imports
neither torch nor transformers; jinja2 (>= 3.1, the same floor as transformers) is imported only
when a template is rendered.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from pcbedge.errors import DependencyError, ModelError, QuestionError

# Names in lookup order; see find_chat_template for why this order.
CHAT_TEMPLATE_JSON = "chat_template.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
PROCESSOR_CONFIG = "processor_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def find_chat_template(model_dir: str | Path) -> tuple[str, str] | None:
    """``(template, source)`` of the checkpoint in ``model_dir``, or None when it has none.

    The order is the one transformers 4.57 resolves for a VLM, whose prompt comes from the
    processor and, failing that, from the tokenizer:

    1. ``chat_template.json`` ({"chat_template": ...}): ``ProcessorMixin.get_processor_dict``
       (processing_utils.py) takes this "legacy" file and then ignores chat_template.jinja.
    2. ``chat_template.jinja``: what ``save_pretrained`` writes in 4.57; read by the processor
       and by ``PreTrainedTokenizerBase._from_pretrained`` (tokenization_utils_base.py), where
       "independent chat template file(s) ... take priority over ... the tokenizer config".
    3. ``processor_config.json`` key "chat_template": used by the processor only when neither
       file exists (transformers warns it is deprecated).
    4. ``tokenizer_config.json`` key "chat_template": the tokenizer's own; a string, or a list of
       {"name", "template"} of which "default" is used, as ``get_chat_template`` does without
       tools. Named alternates under ``chat_templates/`` are never the default and are ignored.

    Raises ModelError for a folder that does not exist, an unreadable or malformed file, or a
    template of the wrong type (an empty template renders an empty prompt, so it counts too).
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} not found",
                         fix="pass the checkpoint folder that holds config.json")
    path = folder / CHAT_TEMPLATE_JSON
    if path.is_file():
        data = _read_json(path)
        if "chat_template" not in data:
            raise ModelError(f"{path} has no 'chat_template' key",
                             fix='write {"chat_template": "<jinja text>"} or delete the file')
        return _pick(data["chat_template"], path)
    path = folder / CHAT_TEMPLATE_JINJA
    if path.is_file():
        return _checked(_read_text(path), str(path))
    for name in (PROCESSOR_CONFIG, TOKENIZER_CONFIG):
        path = folder / name
        if path.is_file():
            value = _read_json(path).get("chat_template")
            if value is not None:  # absent or null: this file has no template
                return _pick(value, path)
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}",
                         fix="re-copy the file from the checkpoint (UTF-8 text)") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON: {e}",
                         fix="re-copy the file from the checkpoint or fix the JSON") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} holds a JSON {type(data).__name__}, not an object",
                         fix="re-copy the file from the checkpoint")
    return data


def _pick(value, path: Path) -> tuple[str, str]:
    """A template string as is; from a list of {"name", "template"} (or a {name: template}
    dict) the one named "default", as transformers picks it when no tools are passed."""
    if isinstance(value, str):
        return _checked(value, f"{path} [chat_template]")
    named = None
    if isinstance(value, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) for t in value):
        named = {t["name"]: t.get("template") for t in value}
    elif isinstance(value, dict):  # transformers keeps a {name: template} dict as it is
        named = value
    if named is not None:
        if "default" not in named:
            raise ModelError(f"{path} lists chat templates {sorted(named)} but none is named "
                             "'default'", fix="name the template to use 'default'")
        return _checked(named["default"], f"{path} [chat_template: default]")
    raise ModelError(f"{path}: chat_template is a {type(value).__name__}, not a string, a list"
                     ' of {"name", "template"} objects or a {name: template} object',
                     fix="write the Jinja template as a JSON string")


def _checked(template, source: str) -> tuple[str, str]:
    if not isinstance(template, str) or not template.strip():
        raise ModelError(f"the chat template in {source} is {template!r:.40}, not Jinja text",
                         fix="restore the template the model was trained with")
    return template, source


class _TemplateRaised(Exception):
    """Set as the base of the error ``raise_exception`` throws, to tell it from template bugs."""


@lru_cache(maxsize=16)
def _compile(template: str):
    """``_compile_jinja_template`` of transformers 4.57, minus the assistant-mask tracking."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise DependencyError("rendering a chat template needs jinja2",
                              fix="pip install 'jinja2>=3.1'") from None
    if tuple(int(p) for p in jinja2.__version__.split(".")[:2] if p.isdigit()) < (3, 1):
        raise DependencyError(f"jinja2 {jinja2.__version__} is older than 3.1, which "
                              "transformers requires for chat templates",
                              fix="pip install 'jinja2>=3.1'")

    class Raised(jinja2.exceptions.TemplateError, _TemplateRaised):
        pass

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body, as in transformers when
        its AssistantTracker is inactive (it only records where assistant text lies)."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise Raised(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' override: no HTML escaping, json.dumps options exposed
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:  # TemplateSyntaxError
        raise ModelError(f"the chat template does not compile: {e}",
                         fix="restore the checkpoint's chat template") from None


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                **extra) -> str:
    """The prompt ``apply_chat_template(messages, tokenize=False, ...)`` would give.

    ``extra`` reaches the template as variables, as in transformers: ``tools``/``documents``
    (None unless given), flags such as ``add_vision_id``, and the tokenizer's special tokens
    (``bos_token``, ``eos_token``, ...), which transformers passes from ``special_tokens_map``;
    pass them too when a template uses them. Raises QuestionError when the template rejects the
    messages via ``raise_exception`` (a bad request) and ModelError when the template itself
    fails (a broken or mismatched checkpoint template).
    """
    for flag in ("continue_final_message", "return_assistant_tokens_mask"):
        if extra.get(flag):
            raise TypeError(f"render_chat does not implement transformers' {flag}")
    if not isinstance(template, str):
        raise ModelError(f"the chat template is a {type(template).__name__}, not Jinja text",
                         fix="pass the text find_chat_template returns")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise QuestionError(f"messages must be a list of dicts, got {type(messages).__name__}",
                            fix='pass e.g. [{"role": "user", "content": "..."}]')
    compiled = _compile(template)
    extra.setdefault("tools", None)
    extra.setdefault("documents", None)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **extra)
    except _TemplateRaised as e:
        raise QuestionError(f"the chat template rejected the messages: {e}",
                            fix="change the messages to the form the model's template "
                                "accepts (roles, order, content)") from None
    except Exception as e:  # jinja2 TemplateError/SecurityError, TypeError in an expression
        raise ModelError(f"the chat template failed to render ({type(e).__name__}: {e})",
                         fix="check that the template is the checkpoint's own and that the "
                             "messages use its content format") from None


def vision_messages(question: str, n_images: int, system: str | None = None) -> list[dict]:
    """The standard Hugging Face multimodal message list: an optional system turn, then one
    user turn with ``n_images`` image parts before the question (a VLM's template turns each
    into <|vision_start|><|image_pad|><|vision_end|>; the pixels go to the image processor)."""
    if not isinstance(question, str):
        raise QuestionError(f"the question must be text, got {type(question).__name__}",
                            fix="pass the question as a string")
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 0:
        raise QuestionError(f"n_images={n_images!r} is not a count of images",
                            fix="pass 0 or more, e.g. 2 for a (test, template) pair")
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    messages.append({"role": "user", "content": content})
    return messages
