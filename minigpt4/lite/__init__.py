"""The embedded offline default, `minigpt4_lite`: EfficientNet-Lite0 → trained projection → SmolLM2-135M + LoRA.

* `vision`: the frozen EfficientNet-Lite0 read out as class tokens + spatial tokens.
* `gguf_llm`: the LLM's GGUF file converted once into a cache folder, for fast later starts.
* `vocabulary`: the colour words and places the vision readout names (the scene generator draws with them).
* `packages`: finding the PyPI packages that ship the pretrained files; errors that say what to install.
* `data`: `python -m minigpt4 make-data lite`, the offline training data of the projection.
"""
