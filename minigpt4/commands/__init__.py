"""Command-line tools that sit on the chat engine (`python -m minigpt4 chat|caption`)."""
