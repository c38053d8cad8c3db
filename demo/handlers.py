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
        return (
            f"Model preset **{chat.preset_name}** on **{chat.device}** · "
            f"images up to {megapixels:.3g} MP and {megabytes:.3g} MB"
        )

    def _session(self, session: ChatSession | None) -> ChatSession:
        return self.chat.new_session() if session is None else session

    def upload(
        self, image: dict[str, Any] | None, session: ChatSession | None
    ) -> tuple[str, ChatSession, str]:
        """`/upload`: add an image turn to the conversation; returns a status line (and, kept on
        the server for `show_image`, the checked path of the image)."""
        session = self._session(session)
        path = _image_path(image)
        try:
            self.chat.upload_image(session, path)
        except InputError as error:
            raise _user_error(error) from error
        count = session.n_images
        noun = "image" if count == 1 else "images"
        return f"Image received ({count} {noun} in this chat). Ask a question about it.", session, path

    def upload_pending(
        self, image: dict[str, Any] | None, session: ChatSession | None
    ) -> tuple[Any, Any, Any]:
        """Before a message is sent: upload the image waiting in the image box, if any.

        The box empties after each upload, so an image there (an example just picked, a file dropped
        in) has not been sent yet; pressing Enter then means "about this image".
        """
        if image is None or not image.get("path"):
            return gr.skip(), session, None
        return self.upload(image, session)

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
            self.chat.ask(session, text)
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

    def show_image(self, uploaded: str | None, history: list[Message]) -> tuple[None, list[Message]]:
        """After a successful upload: the image joins the chat and the image box empties.

        `uploaded` is the path `upload` checked, held in server-side state: the image box's own
        value comes from the client and is never shown back as a file.
        """
        if uploaded is None:
            return None, history
        return None, [*history, {"role": "user", "content": {"path": uploaded}}]

    def send(
        self,
        text: str,
        session: ChatSession | None,
        history: list[Message],
        num_beams: float,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
        do_sample: bool,
    ) -> Iterator[tuple[str, ChatSession, list[Message]]]:
        """The chat box: like `/ask`, but the answer streams into the chatbot."""
        session = self._session(session)
        generation = _generation(num_beams, temperature, top_p, max_new_tokens, do_sample)
        answers = self._start(session, text, generation)
        history = [*history, {"role": "user", "content": text}]
        yield "", session, history
        for answer in answers:
            yield "", session, [*history, {"role": "assistant", "content": answer}]


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
