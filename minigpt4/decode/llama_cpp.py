"""The llama.cpp runtime: the LLM's GGUF file decoded by llama.cpp through `llama-cpp-python`.

Decoding one token streams every weight once, so on a CPU its speed is set by memory bandwidth
and by how little work surrounds each matrix–vector product. llama.cpp reads the GGUF's quantised
weights directly (a quarter of float16's bytes for Q4) with fused kernels, and it decodes several
sequences in one call (a batch of one token per sequence), which costs hardly more than one.

The prompt goes in as llama.cpp's own multimodal examples feed it: runs of text as token batches,
the image vectors as embedding batches, so the token embeddings come from the GGUF itself and no
other copy of the LLM is needed. Sequences live in slots of one llama.cpp context; an idle sequence keeps its slot (and
its key/values) until a new sequence needs the slot, least recently used first.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
from pathlib import Path

import numpy as np
import torch

from minigpt4.decode.inputs import PromptInput
from minigpt4.errors import ConfigError
from minigpt4.files import write_atomic

log = logging.getLogger(__name__)

_LOG_ERROR = 4  # GGML_LOG_LEVEL_ERROR
_log_callback = None  # keeps the C callback alive for as long as llama.cpp may call it


def _llama():
    """The `llama_cpp` module, its log routed to ours (llama.cpp prints every load step otherwise)."""
    global _log_callback
    try:
        import llama_cpp  # noqa: PLC0415 (an optional dependency, imported when a preset uses it)
    except ImportError as e:
        raise ConfigError(
            "model.llm.runtime: llama_cpp needs the package 'llama-cpp-python' (pip install "
            "llama-cpp-python==0.3.36, or run `bash setup.sh`); or set model.llm.runtime: transformers"
        ) from e
    if _log_callback is None:

        @llama_cpp.llama_log_callback
        def forward(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
            if level == _LOG_ERROR:
                log.error("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

        _log_callback = forward
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


# GGUF weight types a file can be converted to once (cached), by llama.cpp's own quantiser
# (the keys are `model.llm.runtime_weights`'s choices).
WEIGHT_TYPES = {
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}


def quantize_gguf(source: Path, target: Path, weights: str) -> Path:
    """Write `source` with its weights converted to `weights` (a WEIGHT_TYPES key) to `target`, whole."""
    lib = _llama()
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, WEIGHT_TYPES[weights])
    params.allow_requantize = True
    params.nthread = torch.get_num_threads()

    def write(tmp: Path) -> None:
        if lib.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
            raise ConfigError(f"llama.cpp could not convert {source} to {weights}")

    write_atomic(target, write)
    return target


def converted_gguf(gguf_path: Path, weights: str) -> Path:
    """`gguf_path` with its weights converted to `weights` (a WEIGHT_TYPES key), made once and cached."""
    from minigpt4.gguf_checkpoint import cache_entry  # noqa: PLC0415

    entry = cache_entry(gguf_path)
    target = entry.with_name(f"{entry.name}-{weights}.gguf")
    if target.is_file():
        return target
    log.info("LLM decode: converting %s to %s once (%s)", gguf_path.name, weights, target)
    return quantize_gguf(gguf_path, target, weights)


class LlamaSequence:
    """A sequence's slot in the context (None: it has none, nothing cached) and its length."""

    def __init__(self) -> None:
        self.slot: int | None = None
        self.length = 0
        self.last_used = 0
        self.active = False  # decoding now: its slot is not to be taken


class LlamaCppRuntime:
    """A GGUF model in one llama.cpp context with `max_sequences` slots of `context_tokens` each."""

    name = "llama_cpp"
    batched = True

    def __init__(
        self, gguf_path: str | Path, context_tokens: int, max_sequences: int = 8, threads: int | None = None
    ) -> None:
        lib = _llama()
        self.lib = lib
        gguf_path = Path(gguf_path)
        if not gguf_path.is_file():
            raise ConfigError(f"model.llm.gguf_file: {gguf_path} not found")
        threads = threads or torch.get_num_threads()
        model_params = lib.llama_model_default_params()
        # Read into llama.cpp's own buffers, not memory-mapped: on a CPU it repacks the weights into
        # the layout of its fastest kernels, and a mapped file would stay resident beside that copy
        # (a 7B Q4_0 GGUF: 7.7 GB of RSS mapped, 4.0 GB read).
        model_params.load_mode = lib.LLAMA_LOAD_MODE_NONE
        self.model = lib.llama_model_load_from_file(str(gguf_path).encode(), model_params)
        if not self.model:
            raise ConfigError(f"llama.cpp cannot load {gguf_path} (not a GGUF model it knows)")
        params = lib.llama_context_default_params()
        params.n_ctx = context_tokens * max_sequences
        params.n_batch = 512
        # Under 64 positions per physical batch: from 64 on, flash attention switches to a tiled
        # kernel, and a prompt prefilled in one go would decode differently from one reused in parts.
        params.n_ubatch = 32
        params.n_seq_max = max_sequences
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = False  # one KV stream per sequence: its answer does not depend on the others
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise ConfigError(f"llama.cpp cannot make a context of {params.n_ctx} tokens for {gguf_path}")
        self.memory = lib.llama_get_memory(self.ctx)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.hidden = lib.llama_model_n_embd(self.model)
        self.n_batch = params.n_batch
        self.max_sequences = max_sequences
        self.context_tokens = context_tokens
        self.threads = threads
        self.path = gguf_path
        self._tokens = lib.llama_batch_init(self.n_batch, 0, 1)
        self._embeds = lib.llama_batch_init(self.n_batch, self.hidden, 1)
        self._slots: list[LlamaSequence | None] = [None] * max_sequences
        self._clock = 0
        # Freed before the interpreter tears down: ggml aborts if its threads outlive the context.
        atexit.register(self.close)
        log.info(
            "LLM decode: llama.cpp, %s, %d slots × %d tokens, %d thread(s)",
            gguf_path.name,
            max_sequences,
            context_tokens,
            threads,
        )

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_batch_free(self._tokens)
            self.lib.llama_batch_free(self._embeds)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None

    # --- sequences --------------------------------------------------------------------------------

    def new_sequence(self) -> LlamaSequence:
        return LlamaSequence()

    def release(self, seq: LlamaSequence) -> None:
        if seq.slot is not None:
            self.lib.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
            self._slots[seq.slot] = None
        seq.slot, seq.length = None, 0

    def reserve(self, seq: LlamaSequence, positions: int) -> bool:
        return True  # every slot holds a whole context: a sequence admitted has its room

    def max_beams(self, context_positions: int, asked: int) -> int:
        return asked  # beam search runs in transformers, beside this context

    def _touch(self, seq: LlamaSequence) -> None:
        self._clock += 1
        seq.last_used = self._clock

    def _take_slot(self, seq: LlamaSequence) -> None:
        """Give `seq` a slot: a free one, else the least recently used idle one's."""
        free = [i for i, s in enumerate(self._slots) if s is None]
        if free:
            slot = free[0]
        else:
            idle = [s for s in self._slots if s is not None and not s.active]
            if not idle:
                raise RuntimeError(
                    "every llama.cpp slot is decoding; the batcher admits at most max_sequences"
                )
            victim = min(idle, key=lambda s: s.last_used)
            slot = victim.slot
            self.release(victim)
        self._slots[slot] = seq
        seq.slot, seq.length = slot, 0

    # --- decoding ---------------------------------------------------------------------------------

    def _decode(self, batch, n: int) -> None:
        batch.n_tokens = n
        code = self.lib.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode failed (code {code})")

    def _logits(self, row: int) -> torch.Tensor:
        pointer = self.lib.llama_get_logits_ith(self.ctx, row)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy())

    def prefill(self, seq: LlamaSequence, prompt: PromptInput, keep: int) -> torch.Tensor:
        if seq.slot is None:
            self._take_slot(seq)
        if keep > seq.length:
            raise ValueError(f"cannot keep {keep} positions of a sequence that holds {seq.length}")
        if keep + len(prompt) > self.context_tokens:
            raise ValueError(f"{keep + len(prompt)} positions do not fit a slot of {self.context_tokens}")
        if seq.length > keep:
            self.lib.llama_memory_seq_rm(self.memory, seq.slot, keep, -1)
        seq.length = keep
        self._touch(seq)
        last = 0
        for run in prompt.runs():
            if isinstance(run, torch.Tensor):
                last = self._feed_vectors(seq, run)
            else:
                last = self._feed_tokens(seq, run)
        return self._logits(last)

    def _feed_tokens(self, seq: LlamaSequence, tokens: list[int]) -> int:
        """Append text tokens to `seq` in token batches; the batch row of the last one (its logits)."""
        batch = self._tokens
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            for j, token in enumerate(chunk):
                batch.token[j] = token
                self._place(batch, j, seq, start + j == len(tokens) - 1)
            self._decode(batch, len(chunk))
            seq.length += len(chunk)
        return len(chunk) - 1

    def _feed_vectors(self, seq: LlamaSequence, vectors: torch.Tensor) -> int:
        """Append image vectors (n, hidden) to `seq` in embedding batches; the row of the last one."""
        rows = np.ascontiguousarray(vectors.detach().to(torch.float32).cpu().numpy())
        if rows.ndim != 2 or rows.shape[1] != self.hidden:
            raise ValueError(f"image vectors must be (n, {self.hidden}), got {tuple(rows.shape)}")
        batch = self._embeds
        for start in range(0, len(rows), self.n_batch):
            chunk = rows[start : start + self.n_batch]
            ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
            for j in range(len(chunk)):
                self._place(batch, j, seq, start + j == len(rows) - 1)
            self._decode(batch, len(chunk))
            seq.length += len(chunk)
        return len(chunk) - 1

    def _place(self, batch, j: int, seq: LlamaSequence, logits: bool) -> None:
        """Row `j` of `batch` goes to `seq`'s next position (`seq.length` counts the rows before it)."""
        batch.pos[j] = seq.length + j
        batch.n_seq_id[j] = 1
        batch.seq_id[j][0] = seq.slot
        batch.logits[j] = logits

    def step(self, seqs: list[LlamaSequence], tokens: list[int]) -> torch.Tensor:
        batch = self._tokens
        for j, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            if seq.slot is None or seq.length >= self.context_tokens:
                raise ValueError("a decode step needs a prefilled sequence with room left")
            batch.token[j] = token
            batch.pos[j] = seq.length
            batch.n_seq_id[j] = 1
            batch.seq_id[j][0] = seq.slot
            batch.logits[j] = True
        self._decode(batch, len(seqs))
        for seq in seqs:
            seq.length += 1
            self._touch(seq)
        return torch.stack([self._logits(j) for j in range(len(seqs))])

    # --- for the bench ----------------------------------------------------------------------------

    def decode_weight_tensors(self) -> list[torch.Tensor]:
        """The GGUF's weight matrices as raw bytes (copied into memory): what one decode step streams.

        Every tensor but the token embedding table, of which a step reads one row (with tied
        embeddings the table is also the output layer: then it is read whole and counted).
        """
        from gguf import GGUFReader  # noqa: PLC0415

        tensors = GGUFReader(self.path).tensors
        names = {t.name for t in tensors}
        read = [t for t in tensors if t.name != "token_embd.weight" or "output.weight" not in names]
        return [
            torch.from_numpy(np.array(t.data).view(np.uint8).reshape(-1)) for t in read if len(t.shape) > 1
        ]
