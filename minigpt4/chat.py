"""The chat engine: one shared model, one `ChatSession` per user, no UI code.

A session holds its conversation, its images' embeddings (each image is encoded once, at
upload) and, with `kv_reuse`, a sequence of the decode runtime holding the LLM's key/values for
everything said so far, so the next turn prefills only what is new. Several sessions may ask at
once: the batcher (`minigpt4/decode/batcher.py`) decodes all their answers together, one batched
step per token, over one shared runtime; nothing in the model is mutated by a session.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from minigpt4.build import build_model, build_runtime
from minigpt4.config import GenerationConfig, load_eval_config
from minigpt4.conversation import (
    IMAGE_TURN,
    Conversation,
    Message,
    Template,
    _exchange_starts,
    clean_text,
    get_template,
)
from minigpt4.decode.batcher import Batcher, Request
from minigpt4.decode.runtime import DecodeRuntime, Sequence, TorchRuntime
from minigpt4.errors import ImageError, InputError, MessageError
from minigpt4.generation import GenerationParams, StreamText
from minigpt4.images import ImageSource, load_image
from minigpt4.model import IMAGE_TOKEN_ID, MiniGPT4

log = logging.getLogger(__name__)

_image_ids = itertools.count()


class ChatSession:
    """One user's conversation: messages, image embeddings and its runtime sequence (the KV cache)."""

    def __init__(self, template: Template) -> None:
        self.conversation = Conversation(template)
        self.images: list[torch.Tensor] = []
        self.image_ids: list[int] = []
        self.sequence: Sequence | None = None  # the runtime's key/values of `cache_atoms`
        self.cache_atoms: list[Any] = []  # what each cached position is: a token id or (image id, k)
        self.generator = torch.Generator().manual_seed(random.randrange(2**31))
        self.busy = threading.Lock()
        self.last_prefill_tokens = 0  # positions the last answer had to prefill (KV reuse saves the rest)
        self.last_prompt_tokens = 0  # positions of the last answer's whole prompt, images included
        self.last_answer_tokens = 0  # tokens the last answer generated (a stop token counted)
        self.last_finish_reason = ""  # "stop" (stop token or string) or "length" (max_new_tokens)
        self.token_counts: dict[tuple[str, str], int] = {}  # tokens per message text (fitting the context)

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
        self.sequence, self.cache_atoms = None, []
        self.token_counts.clear()

    @property
    def cached_positions(self) -> int:
        """Positions whose key/values this session keeps for its next turn."""
        return len(self.cache_atoms) if self.sequence is not None else 0


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
    ) -> None:
        self.model = model
        self.runtime = runtime or TorchRuntime(model.llm)
        self.batcher = Batcher(self.runtime)
        self.tokenizer = model.tokenizer
        self.template = template
        self.defaults = GenerationParams(**asdict(generation or GenerationConfig()))
        self.max_context_tokens = max_context_tokens
        self.max_image_pixels = max_image_pixels
        self.max_image_bytes = max_image_bytes
        self.max_message_chars = max_message_chars
        self.preset_name = preset_name
        self.description = description
        self.kv_reuse = kv_reuse
        self.stop_strings = template.stop_strings(self.tokenizer)
        eos = getattr(getattr(model.llm, "generation_config", None), "eos_token_id", None)
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        self.stop_ids = set(template.stop_token_ids(self.tokenizer)) | set(eos_ids)

    @property
    def max_concurrent_answers(self) -> int:
        """Answers the engine decodes together (more wait for a place)."""
        return self.runtime.max_sequences

    @property
    def device(self) -> str:
        return str(self.model.device)

    def new_session(self) -> ChatSession:
        return ChatSession(self.template)

    def reset(self, session: ChatSession) -> None:
        """Forget the conversation and its images."""
        session.clear()

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

    def ask(self, session: ChatSession, text: str) -> None:
        """Add the user's message. Raises `MessageError` if it is empty or cannot fit the context.

        The text is cleaned (`clean_text`: lone surrogates, control characters) and is only ever
        text: template markers and special tokens in it are escaped when the prompt is rendered.
        On any error the conversation is left as it was.
        """
        if not isinstance(text, str):
            raise MessageError(f"the message must be text, not {type(text).__name__}")
        text = clean_text(text).strip()
        if not text:
            raise MessageError("the message is empty")
        if len(text) > self.max_message_chars:
            raise MessageError(
                f"the message is {len(text):,} characters long; the limit is {self.max_message_chars:,}"
            )
        if session.busy.locked():
            raise MessageError("an answer is still being generated in this conversation")
        before = [replace(m) for m in session.conversation.messages]
        try:
            session.conversation.add_user(text)
            self._fit_context(session, 1)
        except InputError:
            session.conversation.messages[:] = before
            raise
        except Exception as exc:  # a tokenizer failure must not leave a message that breaks every ask
            session.conversation.messages[:] = before
            log.exception("the message could not be tokenized")
            raise MessageError(f"the message could not be tokenized ({type(exc).__name__}: {exc})") from exc

    def add_answer(self, session: ChatSession, text: str) -> None:
        """Record an assistant turn that was said earlier (replaying a history); cleaned like `ask`."""
        if not isinstance(text, str):
            raise MessageError(f"the answer must be text, not {type(text).__name__}")
        session.conversation.add_assistant(clean_text(text).strip())

    # --- answers --------------------------------------------------------------------------------

    def answer(self, session: ChatSession, params: GenerationParams | None = None, **overrides: Any) -> str:
        """The whole answer at once (the original demo's behaviour)."""
        return "".join(self.stream_answer(session, params, **overrides))

    def stream_answer(
        self, session: ChatSession, params: GenerationParams | None = None, **overrides: Any
    ) -> Iterator[str]:
        """Yield the answer in pieces as it is generated; the pieces joined are the answer.

        Closing the iterator early (a Stop button, a client that went away) ends generation and
        keeps what was said so far as the assistant's turn.
        """
        params = replace(params or self.defaults, **overrides)
        messages = session.conversation.messages
        if not messages or messages[-1].role != "user":
            raise MessageError("ask a question first")
        if not session.busy.acquire(blocking=False):
            raise MessageError("an answer is still being generated in this conversation")
        try:
            yield from self._generate(session, params)
        finally:
            session.busy.release()

    def _fit_context(self, session: ChatSession, max_new_tokens: int) -> tuple[list[int], int]:
        """Token ids of the prompt, and how many new tokens the answer may have.

        When prompt + answer would pass `max_context_tokens`, the oldest question–answer text is
        left out of the prompt first. Always kept: the system text, every image (those of left-out
        exchanges move to the oldest kept turn) and the latest exchange. If even that leaves less
        room than `max_new_tokens`, the answer gets the room there is; with no room at all,
        `MessageError`. The session's history itself keeps everything.

        The cost does not grow with the square of the history: each message is tokenised once
        (its count is kept on the session) to estimate how many exchanges to leave out, then
        the prompt is tokenised for that estimate and its neighbours only, to find exactly the
        fewest exchanges to leave out.
        """
        conversation = session.conversation
        limit = self.max_context_tokens - max_new_tokens
        prompts: dict[int, list[int]] = {}

        def prompt(drop: int) -> list[int]:
            if drop not in prompts:
                text = conversation.render(self.tokenizer, drop)
                prompts[drop] = self.model.tokenize_prompt(text, session.n_images)
            return prompts[drop]

        most = conversation.n_droppable()
        ids = prompt(most)
        if len(ids) <= limit:
            drop = self._fewest_drops(session, most, limit, prompt) if most else 0
            if drop:
                log.info("context full: left out the %d oldest exchange(s)", drop)
            return prompt(drop), max_new_tokens
        room = self.max_context_tokens - len(ids)
        if room >= 1:
            log.info("context full: the answer may have %d tokens instead of %d", room, max_new_tokens)
            return ids, room
        raise MessageError(
            f"the conversation needs {len(ids):,} tokens, but the context holds {self.max_context_tokens:,}: "
            "send a shorter message or restart"
        )

    def _fewest_drops(
        self, session: ChatSession, most: int, limit: int, prompt: Callable[[int], list[int]]
    ) -> int:
        """The fewest oldest exchanges to leave out for the prompt to hold at most `limit` tokens.

        Leaving out `most` is known to fit. The per-message counts give an estimate; the real
        prompt is then tokenised around it, galloping and bisecting, so the answer is exact
        (a prompt only shrinks as exchanges are left out) after a few tokenisations.
        """
        messages = session.conversation.messages
        cuts = [
            0,
            *_exchange_starts(messages)[1:],
            len(messages),
        ]  # exchange k is messages[cuts[k]:cuts[k+1]]
        estimate = len(prompt(most))
        guess = most
        while guess > 0:  # only the exchanges that may fit are counted
            size = sum(self._message_tokens(session, m) for m in messages[cuts[guess - 1] : cuts[guess]])
            if estimate + size > limit:
                break
            guess -= 1
            estimate += size

        def fits(drop: int) -> bool:
            return len(prompt(drop)) <= limit

        # Bracket the answer: `low` does not fit (-1: nothing below 0), `high` fits.
        step = 1
        if fits(guess):
            low, high = -1, guess
            while high > 0:
                probe = max(high - step, 0)
                if not fits(probe):
                    low = probe
                    break
                high, step = probe, step * 2
        else:
            low, high = guess, most
            while low + step < most:
                if fits(low + step):
                    high = low + step
                    break
                low, step = low + step, step * 2
        while high - low > 1:
            middle = (low + high) // 2
            if fits(middle):
                high = middle
            else:
                low = middle
        return high

    def _message_tokens(self, session: ChatSession, message: Message) -> int:
        """About how many prompt tokens a message takes, its images aside (kept per text on the session)."""
        key = (message.role, message.text)
        count = session.token_counts.get(key)
        if count is None:
            template = self.template
            prefix = template.user_prefix if message.role == "user" else template.assistant_prefix
            piece = prefix + message.text + template.sep
            count = len(self.tokenizer(piece, add_special_tokens=False).input_ids)
            session.token_counts[key] = count
        return count

    def _atoms(self, session: ChatSession, ids: list[int]) -> list[Any]:
        """Identity of each position: a token id, or (image id, k) for the k-th vector of an image."""
        atoms: list[Any] = []
        n = self.model.n_image_tokens
        seen = 0
        for token in ids:
            if token == IMAGE_TOKEN_ID:
                atoms.append((session.image_ids[seen // n], seen % n))
                seen += 1
            else:
                atoms.append(token)
        return atoms

    @torch.no_grad()
    def _generate(self, session: ChatSession, params: GenerationParams) -> Iterator[str]:
        ids, max_new_tokens = self._fit_context(session, params.max_new_tokens)
        params = replace(params, max_new_tokens=max_new_tokens)
        atoms = self._atoms(session, ids)
        images = torch.stack(session.images) if session.images else None
        embeds = self.model.embed_inputs(torch.tensor([ids]), images)
        stream = StreamText(
            self.tokenizer, self.stop_strings + list(params.stop), self.template.strip_prefixes
        )
        session.last_prompt_tokens = len(ids)
        session.last_answer_tokens, session.last_finish_reason = 0, "length"
        beams = self.runtime.max_beams(len(ids) + max_new_tokens, params.num_beams)  # one cache per beam
        params = replace(params, num_beams=beams)
        if params.num_beams > 1:
            session.sequence, session.cache_atoms = None, []
            session.last_prefill_tokens = len(atoms)
            yield from self._beam_search(session, embeds, params, stream)
            session.conversation.add_assistant(stream.sent)
            return
        if session.sequence is None:
            session.sequence = self.runtime.new_sequence()
        request = Request(
            sequence=session.sequence,
            cached=session.cache_atoms if self.kv_reuse else [],
            embeds=embeds[0],
            atoms=atoms,
            params=params,
            stop_ids=self.stop_ids,
            generator=session.generator,
        )
        session.cache_atoms = []  # invalid until this answer is complete
        self.batcher.submit(request)
        try:
            for token in request.results():
                session.last_answer_tokens += 1
                if token in self.stop_ids:
                    session.last_finish_reason = "stop"
                    break
                piece = stream.add(token)
                if piece:
                    yield piece
                if stream.stopped:
                    session.last_finish_reason = "stop"
                    break
            if not stream.stopped:
                piece = stream.finish()
                if piece:
                    yield piece
        finally:
            request.cancel()
            session.last_prefill_tokens = request.prefilled
            session.conversation.add_assistant(stream.sent)
            if self.kv_reuse:
                session.cache_atoms = request.fed

    @torch.no_grad()
    def decode_prompts(
        self, prompts: list[list[int]], images: torch.Tensor, params: GenerationParams
    ) -> list[list[int]]:
        """Token ids answering each prompt (image `i` in prompt `i`), all decoded together.

        For batch evaluation: fresh sequences, nothing cached, the same token choice as `answer`.
        """
        requests = [
            self.batcher.submit(
                Request(
                    sequence=self.runtime.new_sequence(),
                    cached=[],
                    embeds=self.model.embed_inputs(torch.tensor([ids]), images[i : i + 1])[0],
                    atoms=list(ids),
                    params=params,
                    stop_ids=self.stop_ids,
                )
            )
            for i, ids in enumerate(prompts)
        ]
        return [list(request.results()) for request in requests]

    def _beam_search(
        self, session: ChatSession, embeds: torch.Tensor, params: GenerationParams, stream: StreamText
    ) -> Iterator[str]:
        """Beam search through `generate` (full prefill, the answer comes at once)."""
        output = self.model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            max_new_tokens=params.max_new_tokens,
            num_beams=params.num_beams,
            do_sample=params.do_sample,
            temperature=params.temperature if params.do_sample else None,
            top_p=params.top_p if params.do_sample else None,
            repetition_penalty=params.repetition_penalty,
            eos_token_id=sorted(self.stop_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=stream.stop_strings or None,
            tokenizer=self.tokenizer,
        )
        text, used, stopped = stream.add_tokens(output[0].tolist(), self.stop_ids)
        session.last_answer_tokens = used
        session.last_finish_reason = "stop" if stopped else "length"
        if text:
            yield text


def load_chat(
    preset: str | Path | None = None, device: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Chat:
    """Build the model of a preset (eval_configs/<name>.yaml or a path; None: the default) and its Chat."""
    cfg = load_eval_config(preset, overrides)
    model = build_model(cfg.model, device)
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
        runtime=build_runtime(cfg.model, model),
    )
