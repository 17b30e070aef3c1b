"""Chat messages to a prompt string, with the checkpoint's Jinja chat template or a default.

A checkpoint declares its template as HF does: `chat_template.jinja`, or `chat_template` in
tokenizer_config.json (a string, or a list of named templates of which "default" is used). It is
rendered in Jinja's immutable sandbox with `messages`, `add_generation_prompt=True`,
`bos_token`, `eos_token` and `raise_exception`, like transformers' apply_chat_template, so
templates written for HF models work unchanged. An error the template raises (e.g. "system
role not supported") is the client's problem and becomes a 400 naming `messages`.

Without a template (moeflow's own checkpoints are base models with no chat special tokens) the
DEFAULT_TEMPLATE is plain text a base model can continue:

    System: {system}\n\nUser: {user}\n\nAssistant: {assistant}\n\nAssistant:

The generation prompt ends at the colon, not at "Assistant: ": a byte-level BPE spells a word
together with the space before it ("Ġhello"), so a prompt ending in a bare space would ask the
model to continue from a token it rarely saw there. The model therefore writes the separating
space itself, and the reply would start with it (" Hello"). That space is part of the
"Role: content" format, not of the content, so the default template declares it as
`reply_prefix` and the server drops it from the start of each reply (app.py, with
moeflow.infer.text's TextStream). Templates from checkpoints end their generation prompt where
the reply begins; their prefix is "".
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

DEFAULT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class TemplateError(ValueError):
    """The template refused the conversation or failed while rendering it."""


def find_chat_template(directory: str | Path) -> str | None:
    """The chat template a checkpoint directory declares, or None."""
    d = Path(directory)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text()
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text()).get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template.strip():
            return template
    return None


class ChatTemplate:
    def __init__(self, source: str | None = None, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source if source is not None else DEFAULT_TEMPLATE
        self.is_default = source is None
        self.reply_prefix = " " if self.is_default else ""  # see the module docstring
        self._specials = {"bos_token": bos_token, "eos_token": eos_token}
        self._template  # compile now: a broken template fails at startup, not per request

    @cached_property
    def _template(self):
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            return env.from_string(self.source)
        except TemplateSyntaxError as e:
            raise ValueError(f"chat template does not compile: {e}") from None

    def render(self, messages: list[dict]) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         **self._specials)
        except TemplateError:
            raise
        except Exception as e:  # noqa: BLE001 - a template can fail in any Jinja way
            raise TemplateError(f"chat template failed on these messages: {e}") from None


def _raise(message: str):
    raise TemplateError(message)
