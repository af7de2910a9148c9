"""The prompt of a Qwen-VL answer, torch-free: the checkpoint's own chat template rendered with
the question and one image part per image (:mod:`pcbedge.runtime.chat_template`), tokenized, and
each image's single ``<|image_pad|>`` expanded to one token per merged patch, as transformers'
Qwen2-VL processor does."""
from __future__ import annotations

from pcbedge.errors import BundleError, QuestionError
from pcbedge.families.qwen_vl.answer import SPECIAL_RE
from pcbedge.runtime.chat_template import render_chat, vision_messages


def check_question(question: str) -> None:
    special = SPECIAL_RE.search(question)
    if special:   # it would add image slots or end the turn inside the prompt
        raise QuestionError(f"the question holds the special token {special.group(0)!r}",
                            fix="ask in plain text; the runner adds the chat and image "
                                "tokens itself")


def prompt_text(template: str, question: str, n_images: int, system: str | None = None,
                special_tokens: dict | None = None) -> str:
    """The rendered chat prompt of one user turn (images first, then the question)."""
    check_question(question)
    return render_chat(template, vision_messages(question, n_images, system),
                       add_generation_prompt=True, **(special_tokens or {}))


def prompt_ids(tokenizer, text: str, grids, *, image_token_id: int, merge: int,
               where: str = "the bundle") -> list[int]:
    """Token ids of ``text`` with each image placeholder expanded to its merged patches."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    unit = merge ** 2
    out, k = [], 0
    for t in ids:
        if t == image_token_id:
            if k >= len(grids):
                raise BundleError(f"the chat template of {where} puts more image slots in the "
                                  f"prompt than the {len(grids)} image(s) given",
                                  fix="check the checkpoint's chat template")
            t_, h, w = grids[k]
            out.extend([t] * (int(t_) * int(h) * int(w) // unit))
            k += 1
        else:
            out.append(t)
    if k != len(grids):
        raise BundleError(f"the prompt of {where} holds {k} image slot(s) for {len(grids)} "
                          "image(s): the tokenizer does not keep <|image_pad|> as one token, or "
                          "the chat template drops image parts",
                          fix="export the bundle with the model's own tokenizer.json and chat "
                              "template")
    return out
