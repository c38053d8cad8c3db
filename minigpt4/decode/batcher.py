"""Continuous batching: one thread decodes the active answers of every session together.

Each answer is a `Request`: its prompt (token ids and image vectors, and the identity of each
position), its own sampling settings, stops and random generator. The batcher thread prefills a
request when it joins (reusing the key/values its sequence already holds for the same leading
positions), then runs one batched step per token for all requests still decoding; a request leaves
when it chooses a stop id, its text reaches a stop string, it reaches its token budget, or its
reader cancels it. Tokens reach the reader through a queue. The batcher is the `Engine`'s
(`minigpt4/decode/engine.py`); nothing else submits to it.

Each token is chosen by `generation.choose_token`: `generate`'s logits processors over the answer's
own tokens, then argmax or a draw from the request's generator.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from minigpt4.decode.inputs import PromptInput
from minigpt4.decode.kv_budget import KVBudgetError
from minigpt4.decode.runtime import DecodeRuntime, Sequence
from minigpt4.decode.stops import Stops
from minigpt4.generation import GenerationParams, choose_token

log = logging.getLogger(__name__)

_END = object()
_STOP = object()  # tells the batcher's thread to end


@dataclass
class Request:
    """One answer to decode. `atoms[i]` says what position i is (a token id, or an image vector)."""

    sequence: Sequence
    cached: list[Any]  # the atoms `sequence` holds now that may be reused (from earlier turns)
    prompt: PromptInput  # the whole prompt
    atoms: list[Any]
    params: GenerationParams
    stops: Stops
    generator: torch.Generator | None = None
    # Filled in by the batcher:
    fed: list[Any] = field(default_factory=list)  # the atoms the sequence holds when it is done
    prefilled: int = 0  # positions prefilled (the rest came from the cache)
    finish_reason: str = "cancelled"  # "stop" (a stop id or string), "length" (the budget), "cancelled"
    tokens: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    _generated: list[int] = field(default_factory=list)
    _pending: int | None = None  # the token chosen last, to feed at the next step

    def results(self) -> Iterator[int]:
        """The answer's token ids as they come (a stop id last, if one was chosen)."""
        try:
            while True:
                item = self.tokens.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop decoding (a reader that went away); returns once the batcher has let go of it."""
        self.cancelled.set()
        self.done.wait()


class Batcher:
    """Owns a `DecodeRuntime`; `submit` hands it a request, its thread does the rest."""

    def __init__(self, runtime: DecodeRuntime) -> None:
        self.runtime = runtime
        self._incoming: queue.Queue[Request] = queue.Queue()
        self._waiting: list[Request] = []
        self._active: list[Request] = []
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.steps = 0  # batched steps run (with how many rows each: `rows`)
        self.rows = 0

    def submit(self, request: Request) -> Request:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="decode-batcher", daemon=True)
                self._thread.start()
                # Ended before the interpreter tears down: native thread pools (torch's, llama.cpp's)
                # abort the process if a thread that used them is still alive at that point.
                atexit.register(self.close)
        self._incoming.put(request)
        return request

    def close(self) -> None:
        """End the thread once the answers in hand are done (a later `submit` starts a new one)."""
        with self._lock:
            thread = self._thread
            if thread is None or not thread.is_alive():
                return
            self._incoming.put(_STOP)
        thread.join(timeout=60)

    @property
    def active(self) -> int:
        return len(self._active)

    # --- the batcher's thread --------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not (stopping and not self._active and not self._waiting):
            block = not self._active and not self._waiting
            try:
                item = self._incoming.get(block=block, timeout=None if block else 0)
                while True:
                    if item is _STOP:
                        stopping = True
                    else:
                        self._waiting.append(item)
                    item = self._incoming.get_nowait()
            except queue.Empty:
                pass
            try:
                self._admit()
                if self._active:
                    self._step()
            except Exception as e:  # noqa: BLE001 (a bug must not leave readers waiting forever)
                log.exception("the batcher failed")
                for request in self._active + self._waiting:
                    request.fed = []
                    self.runtime.release(request.sequence)
                    self._finish(request, e)
                self._active, self._waiting = [], []

    def _admit(self) -> None:
        """Prefill waiting requests in order while the runtime has a sequence and room for them."""
        still_waiting = []
        for request in self._waiting:
            if request.cancelled.is_set():
                self._finish(request)
            elif not still_waiting and len(self._active) < self.runtime.max_sequences:
                try:
                    fits = self.runtime.reserve(
                        request.sequence, len(request.atoms) + request.params.max_new_tokens
                    )
                except KVBudgetError as e:  # larger than the whole budget: it could never start
                    self._finish(request, e)
                    continue
                if fits:
                    self._prefill(request)
                else:
                    still_waiting.append(request)  # and the later ones wait behind it
            else:
                still_waiting.append(request)
        self._waiting = still_waiting

    def _prefill(self, request: Request) -> None:
        seq = request.sequence
        # What the sequence still holds of the prompt, less at least one position (for the logits).
        keep = min(_common_prefix(request.cached, request.atoms), seq.length, len(request.atoms) - 1)
        seq.active = True
        try:
            logits = self.runtime.prefill(seq, request.prompt.tail(keep), keep)
        except Exception as e:  # noqa: BLE001 (handed to the reader, who raises it)
            log.exception("prefill failed")
            request.fed = []
            self.runtime.release(seq)  # what the failed prefill left must not stay held
            self._finish(request, e)
            return
        request.prefilled = len(request.atoms) - keep
        request.fed = list(request.atoms)
        self._choose(request, logits)
        if request._pending is not None:
            self._active.append(request)

    def _step(self) -> None:
        for request in [r for r in self._active if r.cancelled.is_set()]:
            self._active.remove(request)
            self._finish(request)
        if not self._active:
            return
        batch = list(self._active)
        try:
            logits = self.runtime.step([r.sequence for r in batch], [r._pending for r in batch])
        except Exception as e:  # noqa: BLE001
            log.exception("decode step failed")
            for request in batch:
                self._active.remove(request)
                request.fed = []  # the cache's state is unknown: the next turn prefills everything
                self.runtime.release(request.sequence)
                self._finish(request, e)
            return
        self.steps += 1
        self.rows += len(batch)
        for request, row in zip(batch, logits, strict=True):
            request.fed.append(request._pending)
            self._choose(request, row)
            if request._pending is None:
                self._active.remove(request)

    def _choose(self, request: Request, logits: torch.Tensor) -> None:
        """Pick the next token; send it; keep it to feed unless the answer ends with it."""
        params = request.params
        token = choose_token(params, request._generated, logits, request.generator)
        request._generated.append(token)
        request.tokens.put(token)
        if request.stops.ends(request._generated):
            request.finish_reason = "stop"
        elif len(request._generated) >= params.max_new_tokens:
            request.finish_reason = "length"
        if request.finish_reason != "cancelled" or request.cancelled.is_set():
            request._pending = None
            self._finish(request)
        else:
            request._pending = token

    def _finish(self, request: Request, error: BaseException | None = None) -> None:
        request.sequence.active = False
        if error is not None:
            request.tokens.put(error)
        request.tokens.put(_END)
        request.done.set()


def _common_prefix(a: list[Any], b: list[Any]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
