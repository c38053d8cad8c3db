"""Conversation templates: how a chat history becomes the prompt text the LLM continues.

`vicuna0` and `llama2` reproduce the original MiniGPT-4 demo's rendering byte for byte;
`chat_template` uses the tokenizer's own chat template (modern instruct models). Images appear
in user turns as `<Img><ImageHere></Img>`; `<ImageHere>` is where their embeddings go.

Images are structure, not text: a message counts its images, and only rendering writes their
`<ImageHere>` slots. Text people send (user, assistant and system turns) is plain text: any
template marker in it (`<ImageHere>`, `<Img>`, `###`, `[INST]`, `<|im_start|>`, the tokenizer's
special tokens such as `</s>` …) is broken with a zero-width space after its first character
(`escape_text`), so it can neither add, remove or shift an image slot, nor end a turn, nor become
a special token id. `clean_text` makes text safe to tokenize at all (lone surrogates, controls).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

from minigpt4.model import IMAGE_PLACEHOLDER

IMAGE_TURN = f"<Img>{IMAGE_PLACEHOLDER}</Img>"
MINIGPT4_SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. "
    "You will be able to see the image once I provide it to you. Please answer my questions."
)


# Inserted after the first character of a template marker found in text people sent: invisible
# when shown, and the marker is no longer the string the template or the tokenizer looks for.
MARKER_BREAK = "\u200b"  # ZERO WIDTH SPACE
# Markers of every template, whichever is in use: a vicuna0 chat must not parse `[INST]` either.
TEMPLATE_MARKERS = (
    IMAGE_PLACEHOLDER, "<Img>", "</Img>", "###", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>",
)  # fmt: skip
_CHAT_MARKER = r"<\|[^<>|\s]{1,40}\|>"  # chat-template markers: <|im_start|>, <|eot_id|>, …


def clean_text(text: str) -> str:
    """`text` made safe to tokenize: lone UTF-16 surrogates become U+FFFD, `\\r\\n` and `\\r` become
    `\\n`, other control characters (NUL, escape, …) except newline and tab are removed."""
    # A valid surrogate pair (from JSON "\\ud83d\\ude00") becomes its character; a lone one U+FFFD.
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")


def escape_text(text: str, special_tokens: Iterable[str] = ()) -> str:
    """`text` with every template marker and special token broken by `MARKER_BREAK` (see the module doc)."""
    pattern = _marker_pattern(tuple(sorted(set(special_tokens))))
    while True:  # breaking `####` once leaves `###`: repeat until no marker is left
        escaped = pattern.sub(lambda m: m.group(0)[0] + MARKER_BREAK + m.group(0)[1:], text)
        if escaped == text:
            return text
        text = escaped


@functools.lru_cache(maxsize=16)
def _marker_pattern(special_tokens: tuple[str, ...]) -> re.Pattern[str]:
    markers = {*TEMPLATE_MARKERS, *(t for t in special_tokens if len(t) > 1 and not t.isspace())}
    alternatives = [re.escape(m) for m in sorted(markers, key=len, reverse=True)] + [_CHAT_MARKER]
    return re.compile("|".join(alternatives))


def special_tokens_of(tokenizer) -> tuple[str, ...]:
    """Every string the tokenizer turns into a special token id."""
    tokens = set(getattr(tokenizer, "all_special_tokens", ()))
    tokens |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return tuple(sorted(tokens))


@dataclass
class Message:
    """One turn. `images` counts the images at its start; `text` is what was said, as sent."""

    role: str  # "user" | "assistant"
    text: str
    images: int = 0

    def render(self, special_tokens: Iterable[str] = ()) -> str:
        """The turn's content in a prompt: an image slot per image, then the escaped text."""
        text = escape_text(self.text, special_tokens)
        slots = IMAGE_TURN * self.images
        return f"{slots} {text}" if slots and text else slots or text


@dataclass(frozen=True)
class Template:
    """A named way of rendering messages. Stop strings and ids come from the tokenizer."""

    name: str
    system: str = ""
    user_prefix: str = ""
    assistant_prefix: str = ""
    sep: str = ""
    stop_strings_: tuple[str, ...] = ()
    strip_prefixes: tuple[str, ...] = ()
    training_format: str = ""
    end_text: str | None = None  # None: the tokenizer's EOS text

    def render(self, messages: list[Message], tokenizer) -> str:
        """The prompt for `messages`, ending where the assistant's next answer begins."""
        special = special_tokens_of(tokenizer)
        if self.name == "chat_template":
            return tokenizer.apply_chat_template(
                [{"role": role, "content": content} for role, content in _merge_roles(messages, special)],
                tokenize=False,
                add_generation_prompt=True,
            )
        # The original's SeparatorStyle.SINGLE: system + sep, then role + message + sep per turn.
        out = self.system + self.sep
        for m in messages:
            prefix = self.user_prefix if m.role == "user" else self.assistant_prefix
            out += prefix + m.render(special) + self.sep
        return out + self.assistant_prefix

    def stop_strings(self, tokenizer) -> list[str]:
        strings = list(self.stop_strings_)
        if tokenizer.eos_token:
            strings.append(tokenizer.eos_token)
        return strings

    def stop_token_ids(self, tokenizer) -> list[int]:
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for text in self.stop_strings_:
            token = tokenizer.convert_tokens_to_ids(text) if text in tokenizer.get_vocab() else None
            if token is not None and token != tokenizer.unk_token_id:
                ids.append(token)
        return sorted(set(ids))

    def training_prompt(self, instruction: str, tokenizer) -> str:
        """The stage-2 prompt for one image and one instruction, ready for the answer."""
        if self.name == "chat_template":
            return self.render([Message("user", instruction, images=1)], tokenizer)
        return self.training_format.format(f"{IMAGE_TURN} {instruction}")

    def followup_prompt(self, question: str, tokenizer) -> str:
        """What follows an answer's end (`answer_end`) in training data when the user asks again.

        Rendered by the same code as inference prompts: the text that two exchanges add to one, so a
        follow-up is trained exactly as the chat engine will later show it to the model.
        """
        end = self.answer_end(tokenizer)  # already there: training ends each answer with it
        if self.name == "chat_template":
            first = [Message("user", "x", images=1), Message("assistant", "y")]
            before = self.render(first[:1], tokenizer) + "y"
            after = self.render([*first, Message("user", question)], tokenizer)
            if not after.startswith(before):
                raise ValueError(
                    f"{self.name}: the chat template renders an answer differently from a prompt"
                )
            return after[len(before) :].removeprefix(end)
        return self.training_format.format(question).removeprefix(end)

    def answer_end(self, tokenizer) -> str:
        """What ends an answer in training data: `###` for Vicuna v0, the EOS text otherwise."""
        if self.end_text is not None:
            return self.end_text
        if not tokenizer.eos_token:
            raise ValueError("the tokenizer has no EOS token to end answers with")
        return tokenizer.eos_token


def _merge_roles(messages: list[Message], special_tokens: Iterable[str]) -> list[tuple[str, str]]:
    """Chat templates want alternating roles: consecutive turns of one role are joined."""
    merged: list[tuple[str, str]] = []
    for m in messages:
        content = m.render(special_tokens)
        if merged and merged[-1][0] == m.role:
            merged[-1] = (m.role, f"{merged[-1][1]} {content}")
        else:
            merged.append((m.role, content))
    return merged


TEMPLATES = {
    "vicuna0": Template(
        name="vicuna0",
        system=MINIGPT4_SYSTEM,
        user_prefix="Human: ",
        assistant_prefix="Assistant: ",
        sep="###",
        stop_strings_=("###",),
        strip_prefixes=("Assistant:",),
        training_format="###Human: {} ###Assistant: ",
        end_text="###",
    ),
    "llama2": Template(
        name="llama2",
        system=MINIGPT4_SYSTEM,
        user_prefix="<s>[INST] ",
        assistant_prefix=" [/INST] ",
        sep="",
        stop_strings_=("[INST]",),
        training_format="[INST] {} [/INST] ",
    ),
    "chat_template": Template(name="chat_template"),
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r} (known: {', '.join(TEMPLATES)})") from None


@dataclass
class Conversation:
    """A chat history in the original demo's shape: an image turn, then questions and answers."""

    template: Template
    messages: list[Message] = field(default_factory=list)

    def add_image(self) -> None:
        """An uploaded image opens a user turn of its own (the original's `upload_img`)."""
        self.messages.append(Message("user", "", images=1))

    def add_user(self, text: str) -> None:
        """A question joins the image turn it follows, as in the original; otherwise it opens a turn."""
        last = self.messages[-1] if self.messages else None
        if last is not None and last.role == "user" and last.images and not last.text:
            last.text = text
        else:
            self.messages.append(Message("user", text))

    def add_assistant(self, text: str) -> None:
        self.messages.append(Message("assistant", text))

    def render(self, tokenizer, drop_exchanges: int = 0) -> str:
        """The prompt text; `drop_exchanges` oldest user→assistant exchanges are left out.

        Images of dropped exchanges are kept: they move to the front of the oldest kept user turn.
        """
        return self.template.render(self.window(drop_exchanges), tokenizer)

    def window(self, drop_exchanges: int) -> list[Message]:
        if drop_exchanges <= 0:
            return list(self.messages)
        cut = _exchange_starts(self.messages)[drop_exchanges]
        images = sum(m.images for m in self.messages[:cut])
        kept = [Message(m.role, m.text, m.images) for m in self.messages[cut:]]
        if images:
            first_user = next(m for m in kept if m.role == "user")
            first_user.images += images
        return kept

    def n_droppable(self) -> int:
        """How many oldest exchanges can be dropped (the latest one always stays)."""
        return max(0, len(_exchange_starts(self.messages)) - 1)


def _exchange_starts(messages: list[Message]) -> list[int]:
    """Indices where an exchange (user turn(s) after an assistant turn, or the first) begins."""
    starts = []
    for i, m in enumerate(messages):
        if m.role == "user" and (i == 0 or messages[i - 1].role == "assistant"):
            starts.append(i)
    return starts
