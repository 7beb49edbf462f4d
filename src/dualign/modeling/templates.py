"""Prompt templates: how a raw prompt becomes the text the model continues.

``auto`` uses the tokenizer's chat template when it has one, else ``plain``. Named templates:

- ``plain``:  ``User: {prompt}\\nAssistant:``
- ``beaver``: ``BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:`` (Safe-RLHF / Alpaca-7B reproduced)
- ``chat``:   the tokenizer's chat template with one user turn and the generation prompt
- ``none``:   the prompt as is

Any other string containing ``{prompt}`` is used as a template itself.
"""

from __future__ import annotations

from dualign._infra.errors import InputError

NAMED_TEMPLATES = {
    "plain": "User: {prompt}\nAssistant:",
    "beaver": "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:",
    "none": "{prompt}",
}


def check_template(template: str) -> None:
    """``template`` is auto, chat, a named template or a string containing ``{prompt}``."""
    if template not in ("auto", "chat") and "{prompt}" not in NAMED_TEMPLATES.get(template, template):
        names = ", ".join(["auto", "chat", *NAMED_TEMPLATES])
        raise InputError(f"template {template!r} is neither a named template ({names}) "
                         "nor a string containing {prompt}")


def format_prompt(prompt: str, template: str = "auto", tokenizer=None) -> str:
    """Render one prompt with ``template`` (see module docstring)."""
    if template == "auto":
        has_chat = tokenizer is not None and getattr(tokenizer, "chat_template", None)
        template = "chat" if has_chat else "plain"
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InputError("template 'chat': the tokenizer has no chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    check_template(template)
    return NAMED_TEMPLATES.get(template, template).replace("{prompt}", prompt)
