"""Conversation templates: how a chat history becomes the prompt text the LLM continues.

`vicuna0` and `llama2` reproduce the original MiniGPT-4 demo's rendering byte for byte;
`chat_template` uses the tokenizer's own chat template (modern instruct models). Images appear
in user turns as `<Img><ImageHere></Img>`; `<ImageHere>` is where their embeddings go.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minigpt4.model import IMAGE_PLACEHOLDER

IMAGE_TURN = f"<Img>{IMAGE_PLACEHOLDER}</Img>"
MINIGPT4_SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. "
    "You will be able to see the image once I provide it to you. Please answer my questions."
)


@dataclass
class Message:
    role: str  # "user" | "assistant"
    text: str


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
        if self.name == "chat_template":
            return tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.text} for m in _merge_roles(messages)],
                tokenize=False,
                add_generation_prompt=True,
            )
        # The original's SeparatorStyle.SINGLE: system + sep, then role + message + sep per turn.
        out = self.system + self.sep
        for m in messages:
            prefix = self.user_prefix if m.role == "user" else self.assistant_prefix
            out += prefix + m.text + self.sep
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
        question = f"{IMAGE_TURN} {instruction}"
        if self.name == "chat_template":
            return self.render([Message("user", question)], tokenizer)
        return self.training_format.format(question)

    def answer_end(self, tokenizer) -> str:
        """What ends an answer in training data: `###` for Vicuna v0, the EOS text otherwise."""
        if self.end_text is not None:
            return self.end_text
        if not tokenizer.eos_token:
            raise ValueError("the tokenizer has no EOS token to end answers with")
        return tokenizer.eos_token


def _merge_roles(messages: list[Message]) -> list[Message]:
    """Chat templates want alternating roles: consecutive turns of one role are joined."""
    merged: list[Message] = []
    for m in messages:
        if merged and merged[-1].role == m.role:
            merged[-1] = Message(m.role, f"{merged[-1].text} {m.text}")
        else:
            merged.append(Message(m.role, m.text))
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
        self.messages.append(Message("user", IMAGE_TURN))

    def add_user(self, text: str) -> None:
        """A question joins the image turn it follows, as in the original; otherwise it opens a turn."""
        last = self.messages[-1] if self.messages else None
        if last is not None and last.role == "user" and last.text.endswith("</Img>"):
            last.text = f"{last.text} {text}"
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
        images = sum(m.text.count(IMAGE_PLACEHOLDER) for m in self.messages[:cut] if m.role == "user")
        kept = [Message(m.role, m.text) for m in self.messages[cut:]]
        if images:
            first_user = next(m for m in kept if m.role == "user")
            first_user.text = IMAGE_TURN * images + " " + first_user.text
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
