"""Rendering chat conversations into text segments, learned or masked.

With a tokenizer that has a chat template, a conversation is rendered with
``apply_chat_template``, turn by turn: each assistant turn's text (its
content and the template's end-of-turn marker) is learned; everything else
(system and user turns, the template's headers, the generation prompt before
each assistant turn) is masked out of the loss. The template must render a
conversation incrementally (the text of the first ``k`` turns is a prefix of
the text of the first ``k + 1``), which holds for the usual templates (Llama
3, Qwen2, Mistral, ChatML); a template that rewrites earlier turns is refused
with a clear error.

Without a chat template (the project's offline tokenizer, base checkpoints)
the plain template is used::

    ### System:
    {content}
    ### User:
    {content}
    ### Assistant:
    {content}<eos>

each turn on its own lines, each assistant turn's content followed by the
end-of-sequence token, both learned; the ``### Assistant:`` headers and the
other turns are masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from pl_parablock.errors import DataError

__all__ = ["chat_prompt", "chat_segments", "has_chat_template"]


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer renders chats with its own template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _header(role: str) -> str:
    return f"### {role[:1].upper()}{role[1:]}:\n"


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]], generation: bool, source: str) -> str:
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation)
    except Exception as exc:  # jinja2 raises TemplateError subclasses; templates also raise on bad roles
        raise DataError(f"{source}: the tokenizer's chat template failed on this conversation: {str(exc).splitlines()[0]}") from None
    if not isinstance(text, str):
        raise DataError(f"{source}: the chat template returned {type(text).__name__}, not text")
    return text


def chat_segments(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]], source: str = "chat") -> list[tuple[str, bool]]:
    """The conversation as ``(text, learned)`` segments whose concatenation is the rendered chat.

    Raises:
        DataError: the template fails on the conversation or does not render it incrementally.
    """
    segs: list[tuple[str, bool]] = []

    def add(text: str, learned: bool) -> None:
        if not text:
            return
        if segs and segs[-1][1] == learned:
            segs[-1] = (segs[-1][0] + text, learned)
        else:
            segs.append((text, learned))

    if not has_chat_template(tokenizer):
        eos = tokenizer.eos_token or ""
        sep = ""
        for m in messages:
            if m["role"] == "assistant":
                add(sep + _header("assistant"), False)
                add(m["content"] + eos, True)
            else:
                add(sep + _header(m["role"]) + m["content"], False)
            sep = "\n"
        return segs

    prev = ""
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            head = _render(tokenizer, messages[:k], True, source) if k else ""
            if not head.startswith(prev):
                raise DataError(_not_incremental(source, k))
            full = _render(tokenizer, messages[: k + 1], False, source)
            if not full.startswith(prev):
                raise DataError(_not_incremental(source, k))
            if not full.startswith(head):
                raise DataError(
                    f"{source}: turn {k}: the chat template's rendering of the conversation does not start with its "
                    "generation prompt, so the assistant's text cannot be told apart; use a template whose "
                    "add_generation_prompt text precedes each assistant turn"
                )
            add(head[len(prev) :], False)
            add(full[len(head) :], True)
        else:
            full = _render(tokenizer, messages[: k + 1], False, source)
            if not full.startswith(prev):
                raise DataError(_not_incremental(source, k))
            add(full[len(prev) :], False)
        prev = full
    return segs


def _not_incremental(source: str, k: int) -> str:
    return (
        f"{source}: turn {k}: the chat template changes the text of earlier turns when a turn is added, so the "
        "assistant turns cannot be masked exactly; use a template that renders each turn once (or data.format=alpaca)"
    )


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]], source: str = "chat") -> str:
    """The text a model continues to answer the conversation's last assistant turn.

    Everything before the last assistant turn, followed by the generation
    prompt (the template's, or the plain template's ``### Assistant:`` header).
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    history = list(messages[:last])
    if has_chat_template(tokenizer):
        return _render(tokenizer, history, True, source)
    text = "".join(seg for seg, _ in chat_segments(tokenizer, history, source)) if history else ""
    return text + ("\n" if text else "") + _header("assistant")
