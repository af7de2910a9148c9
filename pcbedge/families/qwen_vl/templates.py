"""Chat templates of the Qwen-VL family, as data: the one Qwen2-VL-Instruct ships (the
tiny test checkpoints use it) and a no-system-turn variant as fine-tuning frameworks write it."""
from __future__ import annotations

# The chat template shipped with Qwen/Qwen2-VL-2B-Instruct (chat_template.json and the
# "chat_template" key of tokenizer_config.json, identical in both), copied verbatim from a
# public mirror of that checkpoint's files (sophgo/LLM-TPU models/Qwen2_VL/config/). It adds
# "You are a helpful assistant." when the first message is not a system turn, and turns each
# image part into <|vision_start|><|image_pad|><|vision_end|> ("Picture N: " before it when the
# caller passes add_vision_id=True).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# A Qwen-style template as fine-tuning frameworks often write it: no default system turn, so a
# model trained with it sees a system prompt only when the request carries one. Written with
# whitespace control (trim_blocks/lstrip_blocks matter here) to exercise the environment.
NO_SYSTEM_TEMPLATE = (
    "{%- for message in messages %}\n"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}\n"
    "  {% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}\n"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}\n"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
