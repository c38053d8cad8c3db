"""Decoding runtimes: where the LLM's prompt is prefilled and its tokens are decoded.

* `runtime.py`: the interface (`DecodeRuntime`: sequences, prefill, one batched step) and the
  transformers runtime (each sequence a `DynamicCache`; GPUs, training presets, tiny tests).
* `llama_cpp.py`: the same interface over llama.cpp (`llama-cpp-python`), reading the LLM's GGUF
  file: quantised weights and fused kernels, the fast path on a CPU.
* `lora_gguf.py`: LoRA for llama.cpp: the adapters' deltas merged into a copy of the float16 GGUF,
  made once per checkpoint and cached.
* `kv_budget.py`: the cap on key/value positions the transformers runtime caches, all conversations
  together: idle ones lose theirs least recently used first; beams are limited to what fits.
* `batcher.py`: continuous batching: one thread decodes the active answers of every session
  together, one batched step per token; answers join after their prefill and leave when they stop.
"""
