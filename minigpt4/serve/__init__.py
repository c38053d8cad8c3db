"""`python -m minigpt4 serve`: MiniGPT-4 behind OpenAI's chat-completions HTTP API."""

from minigpt4.serve.app import create_app
from minigpt4.serve.cli import main

__all__ = ["create_app", "main"]
