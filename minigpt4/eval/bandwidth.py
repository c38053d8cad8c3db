"""The memory-bandwidth limit of decoding: one pass over exactly the weights a decode step reads.

Decoding one token multiplies one row by every weight matrix, so no decode step can be faster than
streaming those bytes from memory once. `WeightStream` does only that. A floating-point weight
matrix is read by a matrix–vector product in its own dtype (the same kernels as the transformers
decode step). Any other buffer (a quantised runtime's raw uint8 weights, which torch has no kernel
for) is read by a plain sum over its bytes as 64-bit words: the fastest way this machine reads
memory (a float32 product over the same bytes is bound by its arithmetic: 8 GB/s on one core here,
where a sum reads 30, and llama.cpp's 4-bit kernels decode a 7B model at 13). Its passes per second,
measured on the same threads and under the same load as the decode, are the tokens per second a
decode step would reach with zero overhead.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _is_matrix(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and tensor.dim() == 2


def _as_streamed(tensor: torch.Tensor) -> torch.Tensor:
    """A float matrix as it is; any other tensor's bytes as 64-bit words (a tail of < 8 bytes left out)."""
    if _is_matrix(tensor):
        return tensor
    flat = tensor.reshape(-1).view(torch.uint8)
    return flat[: flat.numel() // 8 * 8].view(torch.int64)


class WeightStream:
    """Streams a list of weight tensors once per `one_pass` (see the module docstring)."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        if not tensors:
            raise ValueError("no weight tensors to stream: the model reads none per decode step?")
        kept = [t.detach() for t in tensors if t.numel()]
        self.bytes = sum(t.numel() * t.element_size() for t in kept)
        self.tensors = [_as_streamed(t) for t in kept if t.numel() * t.element_size() >= 8]
        self._vectors = {
            (t.shape[1], t.dtype, t.device): torch.ones(1, t.shape[1], dtype=t.dtype, device=t.device)
            for t in self.tensors
            if _is_matrix(t)
        }
        self._cuda = any(t.device.type == "cuda" for t in self.tensors)

    @torch.no_grad()
    def one_pass(self) -> None:
        """Read every tensor once."""
        flush = torch.set_flush_denormal(True)
        try:
            for t in self.tensors:
                if _is_matrix(t):
                    F.linear(self._vectors[(t.shape[1], t.dtype, t.device)], t)
                else:
                    t.sum()
        finally:
            if flush:
                torch.set_flush_denormal(False)

    def seconds_per_pass(self, passes: int) -> float:
        """Mean wall time of `passes` passes in a row (like the n−1 steps of a decode measurement)."""
        self._sync()
        start = time.perf_counter()
        for _ in range(passes):
            self.one_pass()
        self._sync()
        return (time.perf_counter() - start) / passes

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()
