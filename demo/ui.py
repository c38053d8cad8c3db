"""The Gradio Blocks app: layout, event wiring and launch. The logic lives in `demo.handlers`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import gradio as gr
from starlette.middleware import Middleware

from demo.examples import example_rows
from demo.handlers import ChatHandlers
from minigpt4.hosts import AllowedHosts, HostCheck

if TYPE_CHECKING:
    from minigpt4.chat import Chat

# One model serves every session. The engine decodes the answers of several sessions together (one
# batched step per token): the events that run the model share one concurrency group of that size,
# and the queue shows the rest their place.
QUEUE_SIZE = 64
# Sessions hold image embeddings and a KV cache: drop those idle for an hour (a closed tab's state
# is dropped by Gradio after an hour too).
SESSION_TTL_S = 3600

INTRO = """# MiniGPT-4
Upload an image, then ask about it. Each upload adds an image to the conversation; **Restart** starts over."""


def build_demo(chat: Chat) -> gr.Blocks:
    """The app for one `Chat` engine, with its queue set up; the named API is `/upload`, `/ask`, `/reset`."""
    handlers = ChatHandlers(chat)
    defaults = chat.defaults
    model = {"concurrency_id": "model", "concurrency_limit": chat.max_concurrent_answers}
    with gr.Blocks(title="MiniGPT-4") as demo:
        session = gr.State(None, time_to_live=SESSION_TTL_S)
        uploaded = gr.State(None, time_to_live=SESSION_TTL_S)  # the path the last upload checked
        gr.Markdown(INTRO)
        gr.Markdown(handlers.model_status(), elem_id="model-status")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", image_mode=None, label="Image", height=300, elem_id="image")
                upload = gr.Button("Upload & Start Chat", variant="primary")
                restart = gr.Button("Restart")
                num_beams = gr.Slider(1, 10, value=defaults.num_beams, step=1, label="Beam search numbers")
                # Temperature and Top p change nothing when decoding is greedy: they are enabled only
                # while Sample is on, and Sample sits right above them.
                do_sample = gr.Checkbox(
                    value=defaults.do_sample,
                    label="Sample",
                    info="Off: always pick the likeliest word (Temperature and Top p then do nothing)",
                    elem_id="sample",
                )
                temperature = gr.Slider(
                    0.1, 2.0, value=defaults.temperature, step=0.1, label="Temperature",
                    interactive=defaults.do_sample, elem_id="temperature",
                )  # fmt: skip
                top_p = gr.Slider(
                    0.05, 1.0, value=defaults.top_p, step=0.05, label="Top p",
                    interactive=defaults.do_sample, elem_id="top-p",
                )  # fmt: skip
                with gr.Accordion("Advanced", open=False):
                    # Longer answers would leave too little of the context for the conversation.
                    longest = max(defaults.max_new_tokens, chat.max_context_tokens // 2)
                    max_new_tokens = gr.Slider(
                        1, longest, value=defaults.max_new_tokens, step=1, label="Max new tokens"
                    )
            with gr.Column(scale=2):
                status = gr.Markdown("Upload an image to begin.", label="Status", elem_id="chat-status")
                chatbot = gr.Chatbot(label="MiniGPT-4", height=480, elem_id="chatbot")
                text = gr.Textbox(
                    placeholder="Ask about the image and press Enter",
                    label="Message",
                    show_label=False,
                    submit_btn=True,
                    stop_btn=True,
                    elem_id="message",
                )
        gr.Examples(example_rows(), inputs=[image, text], label="Examples: pick one, then send the question")
        # API-only output: `/ask` streams plain text to clients, while the page streams into the chatbot.
        answer = gr.Textbox(label="Answer", visible=False)

        generation = [num_beams, temperature, top_p, max_new_tokens, do_sample]
        question = gr.State("")  # the message being answered, moved out of the box at once
        slip = gr.State(None)  # the notice of an image in the box that could not be uploaded
        # The page's Upload button: a slip is a notice and the chat stays clean; API clients call
        # `/upload` (below) and get errors as exceptions. The image events skip Gradio's
        # preprocessing (the engine judges the file); the chat events keep it.
        upload.click(
            handlers.upload_box, [image, session], [image, status, session, uploaded],
            api_visibility="private", preprocess=False, **model,
        ).then(handlers.show_image, [uploaded, chatbot], chatbot, api_visibility="private", queue=False)  # fmt: skip
        gr.on([], handlers.upload, [image, session], [status, session, uploaded], api_name="upload",
              preprocess=False, **model)  # fmt: skip
        do_sample.change(
            handlers.sampling_controls, do_sample, [temperature, top_p], api_visibility="private", queue=False
        )
        # Enter: the question shows at once with a placeholder (no queue); then an image still in the
        # box (an example just picked) is uploaded and shown before it, and the answer streams in.
        sending = (
            text.submit(
                handlers.show_question, [text, chatbot], [text, question, chatbot],
                api_visibility="private", queue=False,
            )
            .then(
                handlers.upload_pending, [image, session], [image, status, session, uploaded, slip],
                api_visibility="private", preprocess=False, **model,
            )
            .then(handlers.show_image, [uploaded, chatbot], chatbot, api_visibility="private", queue=False)
            .then(
                handlers.send, [question, slip, session, chatbot, *generation], [text, status, session, chatbot],
                api_visibility="private", show_progress="hidden", **model,
            )
        )  # fmt: skip
        text.stop(None, cancels=[sending])
        restart.click(
            handlers.reset, [session], [status, session], api_name="reset", cancels=[sending], **model
        ).then(lambda: ([], None, ""), None, [chatbot, image, text], api_visibility="private")
        gr.on([], handlers.ask, [text, session, *generation], [answer, session], api_name="ask", **model)
    demo.queue(max_size=QUEUE_SIZE)
    return demo


def launch(
    chat: Chat,
    *,
    host: str,
    port: int | None,
    share: bool,
    block: bool = True,
    allowed_hosts: Sequence[str] = (),
) -> gr.Blocks:
    """Build the app for `chat` and serve it; with `block=False` it returns once the server is up.

    Requests addressed to a host name other than localhost, `host`, `allowed_hosts` and the
    environment's (`minigpt4.hosts`) get 400: a page elsewhere cannot drive the app by DNS
    rebinding. A share link's gradio.live names are added with `share`.
    """
    demo = build_demo(chat)
    extra = [*allowed_hosts, *(["*.gradio.live"] if share else [])]
    hosts = AllowedHosts.for_server(host, extra)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=chat.max_image_bytes,
        prevent_thread_lock=not block,
        theme=gr.themes.Soft(),
        app_kwargs={"middleware": [Middleware(HostCheck, allowed=hosts)]},
        quiet=True,  # Gradio's own lines name launch() arguments; app.py says where the app runs
    )
    return demo
