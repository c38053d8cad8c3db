"""What the app's events do, written against the Chat engine's API only (no tensors, no torch).

Each browser tab and each `gradio_client.Client` has its own `ChatSession`, kept in a `gr.State`;
it is created on the first event that needs it. User errors of the engine (`InputError`) become
`gr.Error` toasts (or client exceptions) and the app keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
from gradio.utils import get_upload_folder

from minigpt4.errors import InputError

if TYPE_CHECKING:
    from minigpt4.chat import Chat, ChatSession

log = logging.getLogger(__name__)

NO_IMAGE_YET = "Upload an image first: choose one, then press “Upload & Start Chat” or send your question."
# One text for every path that is not an upload of this app's, so that errors never tell a client
# whether some file exists on the server, or how big it is.
NOT_UPLOADED = "No uploaded image was found: choose the image again."

# A chatbot message in Gradio's "messages" format: {"role": …, "content": …}.
Message = dict[str, Any]
# The answer shown from the moment a question is sent until its first piece arrives.
THINKING = "Thinking…"
THINKING_MESSAGE: Message = {"role": "assistant", "content": THINKING}


def _ends_with_placeholder(history: list[Message], question: str | None = None) -> bool:
    """Whether the chat ends with `show_question`'s two messages (of `question`, when given)."""
    return (
        len(history) >= 2
        and (history[-1].get("role"), _text_of(history[-1])) == ("assistant", THINKING)
        and history[-2].get("role") == "user"
        and (question is None or _text_of(history[-2]) == question)
    )


def _without_placeholder(history: list[Message], question: str) -> list[Message]:
    """The chat with `show_question`'s two messages (question, placeholder) replaced by the question
    alone; a chat that does not end so (a cleared page) gets the question appended."""
    if _ends_with_placeholder(history, question):
        return [*history[:-1]]
    return [*history, {"role": "user", "content": question}]


def _text_of(message: Message) -> str | None:
    """The text of a chat message, as the page sends it back (a list of parts) or as written (a str)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text", "") for p in content)
    return None


def _user_error(error: InputError) -> gr.Error:
    log.info("user error: %s", error)
    return gr.Error(str(error), print_exception=False)


def _image_path(image: dict[str, Any] | None) -> str:
    """The server-side path of an image input that skipped Gradio's preprocessing.

    The image events run with `preprocess=False` so that the engine, not Gradio's PIL call, is the
    one place that opens the file and judges it (unreadable, too many pixels). Gradio checks only
    the payloads tagged as its `FileData` (an upload: a file in its upload folder); an untagged
    `{"path": ...}` from a client reaches us as it was sent. So the path must name a file inside the
    upload folder, once links are resolved, or it is refused with one text whatever it names.
    """
    if image is None or not image.get("path"):
        raise gr.Error("No image was given: choose an image first.", print_exception=False)
    path = str(image["path"])
    if not is_upload(path):
        log.warning("refused an image path outside the upload folder")
        raise gr.Error(NOT_UPLOADED, print_exception=False)
    return path


def is_upload(path: str) -> bool:
    """Whether `path` is a file that Gradio received: in its upload folder, links resolved."""
    try:
        file = Path(path).resolve()
        return file.is_relative_to(Path(get_upload_folder()).resolve()) and file.is_file()
    except (OSError, ValueError):  # NUL bytes, names too long, loops of links
        return False


class ChatHandlers:
    """The functions behind the app's buttons and named API endpoints, bound to one `Chat`."""

    def __init__(self, chat: Chat) -> None:
        self.chat = chat

    def model_status(self) -> str:
        """The status line: which preset runs on which device, and the image limits."""
        chat = self.chat
        megapixels = chat.max_image_pixels / 1e6
        megabytes = chat.max_image_bytes / 1e6
        described = f" ({chat.description})" if chat.description else ""
        return (
            f"Model preset **{chat.preset_name}**{described} on **{chat.device}** · "
            f"images up to {megapixels:.3g} MP and {megabytes:.3g} MB"
        )

    def _session(self, session: ChatSession | None) -> ChatSession:
        return self.chat.new_session() if session is None else session

    def upload(
        self, image: dict[str, Any] | None, session: ChatSession | None
    ) -> tuple[str, ChatSession, str]:
        """`/upload`: add an image turn to the conversation; returns a status line (and the checked
        path of the image, which the page shows in the chat)."""
        session = self._session(session)
        path = _image_path(image)
        try:
            self.chat.upload_image(session, path)
        except InputError as error:
            raise _user_error(error) from error
        count = session.n_images
        noun = "image" if count == 1 else "images"
        return f"Image received ({count} {noun} in this chat). Ask a question about it.", session, path

    def upload_box(
        self, image: dict[str, Any] | None, session: ChatSession | None
    ) -> tuple[Any, str, ChatSession, str | None]:
        """The Upload button: `/upload`, then the box empties (`show_image` puts the image in the chat).

        A slip (nothing chosen, a file that is not an image) is a notice, not an error: the status
        line says it, the chat stays as it was and the box empties, so no broken preview is left.
        Returns (image box, status, session, the checked path or None).
        """
        session = self._session(session)
        try:
            status, session, path = self.upload(image, session)
        except gr.Error as error:
            gr.Warning(error.message)
            return None, error.message, session, None
        return None, status, session, path

    def show_image(self, uploaded: str | None, history: list[Message]) -> list[Message]:
        """After an upload: the image joins the chat, before a question still waiting for its answer.

        `uploaded` is the path `upload` checked, held in server-side state: the image box's own
        value comes from the client and is never shown back as a file.
        """
        if uploaded is None:
            return history
        image = {"role": "user", "content": {"path": uploaded}}
        at = len(history) - 2 if _ends_with_placeholder(history) else len(history)
        return [*history[:at], image, *history[at:]]

    def show_question(self, text: str, history: list[Message]) -> tuple[str, str, list[Message]]:
        """On Enter, before the model is free: the question leaves the box and joins the chat at
        once, with a placeholder answer that the first streamed piece replaces."""
        if not text.strip():
            return text, "", history
        return "", text, [*history, {"role": "user", "content": text}, THINKING_MESSAGE]

    def upload_pending(
        self, image: dict[str, Any] | None, session: ChatSession | None
    ) -> tuple[Any, Any, ChatSession | None, str | None, str | None]:
        """Before a message is answered: upload the image waiting in the image box, if any.

        The box empties after each upload, so an image there (an example just picked, a file dropped
        in) has not been sent yet; pressing Enter then means "about this image". Returns (image box,
        status, session, the checked path or None, the notice of a slip or None).
        """
        if image is None or not image.get("path"):
            return gr.skip(), gr.skip(), session, None, None
        box, status, session, path = self.upload_box(image, session)
        return box, status, session, path, None if path else status

    def send(
        self,
        question: str,
        slip: str | None,
        session: ChatSession | None,
        history: list[Message],
        num_beams: float,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
        do_sample: bool,
    ) -> Iterator[tuple[Any, Any, ChatSession, list[Message]]]:
        """The chat box, after `show_question` and `upload_pending`: stream the answer into the
        placeholder. Yields (message box, status, session, chat).

        A user's slip (no image yet, a file that was not an image, an empty message) is a notice: the
        question goes back into the box and the question and placeholder leave the chat.
        """
        session = self._session(session)
        asked = _without_placeholder(history, question)
        if slip is not None:  # upload_pending has shown the notice
            yield question, gr.skip(), session, asked[:-1]
            return
        try:
            generation = _generation(num_beams, temperature, top_p, max_new_tokens, do_sample)
            answers = self._start(session, question, generation)
        except gr.Error as error:
            gr.Warning(error.message)
            yield question, error.message, session, asked[:-1]
            return
        yield gr.skip(), gr.skip(), session, [*asked, THINKING_MESSAGE]
        for answer in answers:
            yield gr.skip(), gr.skip(), session, [*asked, {"role": "assistant", "content": answer}]

    def sampling_controls(self, do_sample: bool) -> tuple[Any, Any]:
        """Temperature and Top p only matter when sampling: enabled with the Sample box, greyed out without."""
        return gr.update(interactive=do_sample), gr.update(interactive=do_sample)

    def reset(self, session: ChatSession | None) -> tuple[str, ChatSession]:
        """`/reset`: forget the conversation and its images.

        A fresh session rather than `chat.reset`: an answer still streaming in the old one (Restart
        cancels it, but the cancel and the reset race) then cannot write into the new conversation.
        """
        return "Chat restarted. Upload an image to begin.", self.chat.new_session()

    def _start(self, session: ChatSession, text: str, generation: dict[str, Any]) -> Iterator[str]:
        """Ask `text` now (user errors raise here) and return the answer so far, growing piece by piece."""
        if session.n_images == 0:
            raise gr.Error(NO_IMAGE_YET, print_exception=False)
        try:
            self.chat.add_question(session, text)
        except InputError as error:
            raise _user_error(error) from error
        return _accumulate(self.chat.stream_answer(session, **generation))

    def ask(
        self,
        message: str,
        session: ChatSession | None,
        num_beams: float,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
        do_sample: bool,
    ) -> Iterator[tuple[str, ChatSession]]:
        """`/ask`: send a message; yields the answer as it grows."""
        session = self._session(session)
        generation = _generation(num_beams, temperature, top_p, max_new_tokens, do_sample)
        for answer in self._start(session, message, generation):
            yield answer, session


def _generation(
    num_beams: float, temperature: float, top_p: float, max_new_tokens: float, do_sample: bool
) -> dict[str, Any]:
    # Sliders may deliver integers as floats ("3.0").
    return {
        "num_beams": int(num_beams),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "max_new_tokens": int(max_new_tokens),
        "do_sample": bool(do_sample),
    }


def _accumulate(pieces: Generator[str, None, None]) -> Iterator[str]:
    """The text so far after each piece. Closing this generator (Stop button, client gone) closes the
    engine's stream, which keeps what was said so far in the session's history."""
    answer = ""
    try:
        for piece in pieces:
            answer += piece
            yield answer
    except InputError as error:  # e.g. an answer still streaming in this session
        raise _user_error(error) from error
    finally:
        pieces.close()
