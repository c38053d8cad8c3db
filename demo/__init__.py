"""The Gradio app for MiniGPT-4: `build_demo(chat)` makes it, `launch(chat, …)` serves it.

It talks to the model only through the `minigpt4.chat.Chat` engine and never imports torch.
"""

from demo.ui import build_demo, launch

__all__ = ["build_demo", "launch"]
