"""The chat: one shared model, one `ChatSession` per user, no UI code and no decode code.

A session holds its conversation and its images' embeddings (each image is encoded once, at
upload). `Chat` checks what users send (limits, clean text), asks the processor
(`minigpt4/processor.py`) for the prompt's ids, and hands them to the decode engine
(`minigpt4/decode/engine.py`), which keeps each session's key/values between turns (so the next turn
prefills only what is new) and decodes the answers of all sessions together. Text streams out
through `StreamText`; nothing in the model is mutated by a session.
"""

from __future__ import annotations

import copy
import itertools
import logging
import random
import threading
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from minigpt4.build import build_beam_runtime, build_model, build_runtime
from minigpt4.config import GenerationConfig, load_preset
from minigpt4.conversation import IMAGE_TURN, Conversation, Template, clean_text, get_template
from minigpt4.decode.engine import Engine, GenerationResult
from minigpt4.decode.runtime import DecodeRuntime, TorchRuntime
from minigpt4.errors import ImageError, InputError, MessageError
from minigpt4.generation import GenerationParams, StreamText
from minigpt4.images import ImageSource, load_image
from minigpt4.model import MiniGPT4
from minigpt4.processor import FittedPrompt, Processor

log = logging.getLogger(__name__)

_image_ids = itertools.count()


class ChatSession:
    """One user's conversation: messages, image embeddings, and what the last answer cost.

    The session is also the engine's key for its cached key/values: they go when it does.
    """

    def __init__(self, template: Template) -> None:
        self.conversation = Conversation(template)
        self.images: list[torch.Tensor] = []
        self.image_ids: list[int] = []
        self.generator = torch.Generator().manual_seed(random.randrange(2**31))
        self.busy = threading.Lock()
        self.token_counts: dict[tuple[str, str], int] = {}  # tokens per message text (fitting the context)
        self.fitted: tuple[int, FittedPrompt] | None = (
            None  # (max_new_tokens, prompt) fitted by `add_question`
        )
        self.last_result: GenerationResult | None = None  # the last answer's tokens, counts, finish reason

    @property
    def history(self) -> list[tuple[str, str]]:
        """(role, text) of every turn ("user" / "assistant"): its images as `<Img><ImageHere></Img>`,
        then its text as said (the prompt holds it escaped: see minigpt4/conversation.py)."""
        return [
            (m.role, " ".join(filter(None, [IMAGE_TURN * m.images, m.text])))
            for m in self.conversation.messages
        ]

    @property
    def n_images(self) -> int:
        return len(self.images)

    def clear(self) -> None:
        self.conversation.messages.clear()
        self.images.clear()
        self.image_ids.clear()
        self.token_counts.clear()
        self.fitted = None


class Chat:
    """Upload images, ask, answer (blocking or streamed), reset — over one shared `MiniGPT4`."""

    def __init__(
        self,
        model: MiniGPT4,
        template: Template,
        generation: GenerationConfig | None = None,
        max_context_tokens: int = 2000,
        max_image_pixels: int = 40_000_000,
        max_image_bytes: int = 20_000_000,
        max_message_chars: int = 20_000,
        preset_name: str = "",
        description: str = "",
        kv_reuse: bool = True,
        runtime: DecodeRuntime | None = None,
        beam_runtime=None,
    ) -> None:
        self.model = model
        self.processor = Processor(
            model.tokenizer, template, model.n_image_tokens, max_context_tokens, model.eos_token_ids
        )
        self.engine = Engine(
            runtime or TorchRuntime(model.llm), self.processor.stops, self.processor.pad_id, beam_runtime
        )
        self.defaults = GenerationParams(**asdict(generation or GenerationConfig()))
        self.max_image_pixels = max_image_pixels
        self.max_image_bytes = max_image_bytes
        self.max_message_chars = max_message_chars
        self.preset_name = preset_name
        self.description = description
        self.kv_reuse = kv_reuse

    def with_engine(self, engine: Engine) -> Chat:
        """This chat (model, processor, limits) decoding on another engine (the bench's, without stops)."""
        other = copy.copy(self)
        other.engine = engine
        return other

    @property
    def template(self) -> Template:
        return self.processor.template

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def max_context_tokens(self) -> int:
        return self.processor.max_context_tokens

    @property
    def max_concurrent_answers(self) -> int:
        """Answers the engine decodes together (more wait for a place)."""
        return self.engine.max_sequences

    @property
    def device(self) -> str:
        return str(self.model.device)

    def new_session(self) -> ChatSession:
        return ChatSession(self.template)

    def reset(self, session: ChatSession) -> None:
        """Forget the conversation, its images and its cached key/values."""
        session.clear()
        self.engine.forget(session)

    def cached_positions(self, session: ChatSession) -> int:
        """Positions whose key/values the engine keeps for the session's next turn."""
        return self.engine.cached_positions(session)

    # --- inputs ---------------------------------------------------------------------------------

    def upload_image(self, session: ChatSession, image: ImageSource) -> None:
        """Encode an image once and open a user turn for it. Raises `ImageError` for bad images."""
        if isinstance(image, (bytes, bytearray)) and len(image) > self.max_image_bytes:
            raise ImageError(f"the image file is {len(image):,} bytes; the limit is {self.max_image_bytes:,}")
        if isinstance(image, (str, Path)) and Path(image).is_file():
            size = Path(image).stat().st_size
            if size > self.max_image_bytes:
                raise ImageError(f"the image file is {size:,} bytes; the limit is {self.max_image_bytes:,}")
        picture = load_image(image, self.max_image_pixels)
        with torch.no_grad():
            embeds = self.model.encode_images(self.model.preprocess([picture]))[0]
        session.images.append(embeds)
        session.image_ids.append(next(_image_ids))
        session.conversation.add_image()
        session.fitted = None

    def add_question(self, session: ChatSession, text: str) -> None:
        """Add the user's message. Raises `MessageError` if it is empty or cannot fit the context.

        The text is cleaned (`clean_text`: lone surrogates, control characters) and is only ever
        text: template markers and special tokens in it are escaped when the prompt is rendered.
        The prompt is fitted here, once, and kept for the answer. On any error the conversation is
        left as it was.
        """
        text = self._clean_message(text)
        if session.busy.locked():
            raise MessageError("an answer is still being generated in this conversation")
        before = [replace(m) for m in session.conversation.messages]
        try:
            session.conversation.add_user(text)
            session.fitted = None
            self._fit(session, self.defaults.max_new_tokens)
        except InputError:
            session.conversation.messages[:] = before
            session.fitted = None
            raise
        except Exception as exc:  # a tokenizer failure must not leave a message that breaks every ask
            session.conversation.messages[:] = before
            session.fitted = None
            log.exception("the message could not be tokenized")
            raise MessageError(f"the message could not be tokenized ({type(exc).__name__}: {exc})") from exc

    def add_past_answer(self, session: ChatSession, text: str) -> None:
        """Record an assistant turn that was said earlier (replaying a history); cleaned like `add_question`."""
        if not isinstance(text, str):
            raise MessageError(f"the answer must be text, not {type(text).__name__}")
        session.conversation.add_assistant(clean_text(text).strip())
        session.fitted = None

    def add_past_question(self, session: ChatSession, text: str) -> None:
        """Record an earlier user turn of a history being replayed: checked like `add_question`, not fitted
        (only the last question of a history needs to fit, and `add_question` fits it)."""
        session.conversation.add_user(self._clean_message(text))
        session.fitted = None

    def _clean_message(self, text: str) -> str:
        if not isinstance(text, str):
            raise MessageError(f"the message must be text, not {type(text).__name__}")
        text = clean_text(text).strip()
        if not text:
            raise MessageError("the message is empty")
        if len(text) > self.max_message_chars:
            raise MessageError(
                f"the message is {len(text):,} characters long; the limit is {self.max_message_chars:,}"
            )
        return text

    def _fit(self, session: ChatSession, max_new_tokens: int) -> FittedPrompt:
        """The session's prompt for an answer of `max_new_tokens`, fitted once per turn."""
        if session.fitted is None or session.fitted[0] != max_new_tokens:
            fitted = self.processor.fit(session.conversation, max_new_tokens, session.token_counts)
            session.fitted = (max_new_tokens, fitted)
        return session.fitted[1]

    # --- answers --------------------------------------------------------------------------------

    def answer(self, session: ChatSession, params: GenerationParams | None = None, **overrides: Any) -> str:
        """The whole answer at once (the original demo's behaviour)."""
        return "".join(self.stream_answer(session, params, **overrides))

    def stream_answer(
        self, session: ChatSession, params: GenerationParams | None = None, **overrides: Any
    ) -> Iterator[str]:
        """Yield the answer in pieces as it is generated; the pieces joined are the answer.

        Closing the iterator early (a Stop button, a client that went away) ends generation and
        keeps what was said so far as the assistant's turn. `session.last_result` then holds the
        answer's token counts and why it ended.
        """
        params = replace(params or self.defaults, **overrides)
        messages = session.conversation.messages
        if not messages or messages[-1].role != "user":
            raise MessageError("ask a question first")
        if not session.busy.acquire(blocking=False):
            raise MessageError("an answer is still being generated in this conversation")
        try:
            yield from self._stream(session, params)
        finally:
            session.busy.release()

    @torch.no_grad()
    def _stream(self, session: ChatSession, params: GenerationParams) -> Iterator[str]:
        fitted = self._fit(session, params.max_new_tokens)
        session.fitted = None  # the answer changes the conversation
        images = torch.stack(session.images) if session.images else None
        prompt = self.processor.inputs(fitted.ids, images, tuple(session.image_ids))
        if not self.kv_reuse:
            self.engine.forget(session)
        generation = self.engine.generate(
            prompt,
            replace(params, max_new_tokens=fitted.max_new_tokens),
            key=session if self.kv_reuse else None,
            generator=session.generator,
        )
        stops = self.engine.stops.with_strings(params.stop)
        stream = StreamText(self.tokenizer, list(stops.strings), self.template.strip_prefixes)
        try:
            for token in generation:
                piece = stream.add(token)
                if piece:
                    yield piece
                if stream.stopped:
                    break
            if not stream.stopped:
                piece = stream.finish()
                if piece:
                    yield piece
        finally:
            session.last_result = generation.cancel()
            session.conversation.add_assistant(stream.sent)


def load_chat(
    preset: str | Path | None = None, device: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Chat:
    """Build the model of a preset (eval_configs/<name>.yaml or a path; None: the default) and its Chat."""
    cfg = load_preset(preset, overrides)
    model = build_model(cfg.model, device, defer_llm=True)
    runtime = build_runtime(cfg.model, model)
    beams = None if isinstance(runtime, TorchRuntime) else (lambda: build_beam_runtime(cfg.model, model))
    return Chat(
        model,
        get_template(cfg.model.template),
        cfg.generation,
        max_context_tokens=cfg.model.max_context_tokens,
        max_image_pixels=cfg.max_image_pixels,
        max_image_bytes=cfg.max_image_bytes,
        max_message_chars=cfg.max_message_chars,
        preset_name=cfg.name,
        description=cfg.description,
        runtime=runtime,
        beam_runtime=beams,
    )
