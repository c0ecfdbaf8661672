"""Chat messages -> prompt text/ids with the model's own Jinja chat template (ChatML if it has none).

Rendering follows transformers' `apply_chat_template` (same sandbox, filters and globals) so the
text matches what the model was trained on. `encode_chat` also marks which tokens the assistant
wrote, for SFT losses that train only on replies.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pagoda.errors import InvalidRequestError, WeightsError
from pagoda.tokenizer.tokenizer import Tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Private-use characters that bracket assistant contents while locating them in the rendered text.
_START, _END = "\U000f0001", "\U000f0002"


@dataclass
class ChatEncoding:
    """Token ids of a rendered conversation and which of them the assistant wrote."""

    ids: list[int]
    assistant_mask: list[bool]  # True on assistant contents and the end-of-turn token after each


def render_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    *,
    tools: list[dict[str, Any]] | None = None,
    **template_vars: Any,
) -> str:
    """Prompt text for `messages`; `template_vars` reach the template (e.g. enable_thinking=False)."""
    return _render(tokenizer, _normalize(messages), add_generation_prompt, tools, template_vars)


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    *,
    tools: list[dict[str, Any]] | None = None,
    **template_vars: Any,
) -> ChatEncoding:
    """Ids of the rendered conversation plus a mask of assistant-written tokens (for SFT)."""
    chat = _normalize(messages)
    plain = _render(tokenizer, chat, add_generation_prompt, tools, template_vars)
    # Bracket each assistant content with markers, first outside its whitespace, then inside it
    # (for templates that `trim` contents); keep the first placement that renders the same text.
    for inner in (False, True):
        marked = [_mark(m, inner) if m["role"] == "assistant" else m for m in chat]
        found = _strip_markers(
            _render(tokenizer, marked, add_generation_prompt, tools, template_vars)
        )
        if found is not None and found[0] == plain:
            text, spans = found
            break
    else:
        raise InvalidRequestError(
            "cannot locate assistant messages in the rendered chat (the template rewrites them)"
        )
    spans = _extend_over_turn_end(tokenizer, text, spans)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    mask = [any(lo <= start < hi for lo, hi in spans) for start, _ in encoding.offsets]
    return ChatEncoding(ids=encoding.ids, assistant_mask=mask)


# ------------------------------------------------------------------ messages
def _normalize(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validated copies of the messages with content reduced to one string."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(
                f"messages[{i}] must be an object with 'role' and 'content', not {type(message).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(
                f"messages[{i}].role must be a non-empty string, got {role!r}"
            )
        if message.get("content") is None and not message.get("tool_calls"):
            raise InvalidRequestError(f"messages[{i}] ({role}) has no content")
        chat.append({**message, "content": content_text(message.get("content"), i)})
    return chat


def content_text(content: Any, index: int) -> str:
    """A string content, or the text parts of an OpenAI-style list of parts joined by newlines."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"messages[{index}].content must be a string or a list of text parts, not {type(content).__name__}"
        )
    texts = []
    for part in content:
        if (
            not isinstance(part, Mapping)
            or part.get("type") != "text"
            or not isinstance(part.get("text"), str)
        ):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise InvalidRequestError(
                f"messages[{index}].content has a part of type {kind!r}; only text parts are supported"
            )
        texts.append(part["text"])
    return "\n".join(texts)


# ------------------------------------------------------------------ templates
class _GenerationTag(jinja2.ext.Extension):
    """Accept transformers' `{% generation %}...{% endgeneration %}` blocks; they render their body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """The template compiled in a sandbox set up like transformers' (cached per template string)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise WeightsError(
            f"the model's chat template is invalid: {e.message} (line {e.lineno})"
        ) from e


def _render(
    tokenizer: Tokenizer,
    chat: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
    template_vars: Mapping[str, Any],
) -> str:
    template = _compile(tokenizer.chat_template or CHATML_TEMPLATE)
    variables = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "unk_token": tokenizer.unk_token,
        "pad_token": tokenizer.pad_token,
        **template_vars,
    }
    try:
        return template.render(
            messages=chat, tools=tools, add_generation_prompt=add_generation_prompt, **variables
        )
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise InvalidRequestError(f"chat template rejected the messages: {_one_line(e)}") from e


# ------------------------------------------------------------ assistant mask
def _mark(message: dict[str, Any], inner: bool) -> dict[str, Any]:
    """The message with its content bracketed by markers (inside its edge whitespace if `inner`)."""
    content = message["content"]
    if not inner:
        return {**message, "content": f"{_START}{content}{_END}"}
    core = content.strip()
    lead = content[: len(content) - len(content.lstrip())]
    trail = content[len(content.rstrip()) :] if core else ""
    return {**message, "content": f"{lead}{_START}{core}{_END}{trail}"}


def _strip_markers(marked: str) -> tuple[str, list[tuple[int, int]]] | None:
    """Text without markers and the (start, end) spans they bracketed; None if unbalanced."""
    text: list[str] = []
    spans: list[tuple[int, int]] = []
    length, opened = 0, None
    for piece in re.split(f"([{_START}{_END}])", marked):
        if piece == _START and opened is None:
            opened = length
        elif piece == _END and opened is not None:
            spans.append((opened, length))
            opened = None
        elif piece in (_START, _END):
            return None
        else:
            text.append(piece)
            length += len(piece)
    return None if opened is not None else ("".join(text), spans)


def _extend_over_turn_end(
    tokenizer: Tokenizer, text: str, spans: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Grow each span over the end-of-turn token right after it: the model must learn to stop."""
    ends = sorted((tokenizer.decode([i]) for i in tokenizer.eos_ids), key=len, reverse=True)
    ends = [e for e in ends if e]
    grown = []
    for start, stop in spans:
        end = next((e for e in ends if text.startswith(e, stop)), "")
        grown.append((start, stop + len(end)))
    return grown


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
