"""Prompt formats: how a dataset row becomes a (prompt, response) pair of strings.

The data module trains on ``prompt + response + EOS`` and, by default, computes the loss on the
response tokens only, so every template returns the two parts separately.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

__all__ = ["TEMPLATES", "TemplateName", "render_alpaca", "render_messages"]

TemplateName = Literal["alpaca", "human_assistant", "plain", "chat_template"]
TEMPLATES: tuple[str, ...] = ("alpaca", "human_assistant", "plain", "chat_template")

# The wording of the original Stanford Alpaca release, which most Alpaca-style checkpoints expect.
_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_alpaca(instruction: str, input_text: str, template: TemplateName, tokenizer: Any) -> str:
    """Render the prompt of an Alpaca row (``instruction`` / ``input``) in ``template``."""
    if template == "alpaca":
        if input_text:
            return _ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
        return _ALPACA_NO_INPUT.format(instruction=instruction)
    question = f"{instruction}\n\n{input_text}" if input_text else instruction
    if template == "human_assistant":
        return f"Human: {question}\n\nAssistant: "
    if template == "plain":
        return f"{question}\n"
    # "chat_template": one user turn rendered by the tokenizer, ready for the assistant's answer.
    return render_messages([{"role": "user", "content": question}], template, tokenizer)


def render_messages(messages: Sequence[Mapping[str, str]], template: TemplateName, tokenizer: Any) -> str:
    """Render a conversation up to (not including) the assistant's answer.

    With a tokenizer that has a chat template it is always used, whatever ``template`` says,
    because a chat-tuned base only behaves well in its own format. Without one, the turns are
    written in the ``Human:/Assistant:`` style.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    parts = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            parts.append(f"{content}\n\n")
        elif role == "user":
            parts.append(f"Human: {content}\n\n")
        else:
            parts.append(f"Assistant: {content}\n\n")
    parts.append("Assistant: ")
    return "".join(parts)
