"""The web demo's page (Gradio): one image, a conversation about it, the checkpoint's answers.

Every answer goes through revision.infer's Predictor, as revision.predict's do; the conversation so far travels
with each request (the page holds it, per user), so requests share nothing but the one loaded model, and the
queue runs them one at a time. revision/serve.py loads the checkpoint and starts the server.
"""
from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import torch

from revision.decode import load_image
from revision.infer import Predictor

# no web fonts: the page needs nothing from outside the server (an offline machine, a browser in a test)
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def describe(predictor: Predictor) -> str:
    """What the checkpoint carries: encoder, alignment, LLM, template (the page's header)."""
    config, model = predictor.config, predictor.model
    alignment = model.alignment.method if model.alignment is not None else "none (raw encoder embeddings)"
    params = sum(p.numel() for p in model.llm.parameters()) / 1e6
    kind = model.llm.config.model_type
    llm = f"{config.base_model or kind} ({kind}, {params:.1f}M parameters, {config.llm_weights} weights)"
    template = predictor.template
    if template == "plain":
        template += " (a captioning checkpoint: the question is ignored)"
    return "\n".join([f"**Checkpoint** `{predictor.folder}`", f"- **Encoder**: `{predictor.encoder_spec}`",
                      f"- **Alignment**: {alignment}", f"- **LLM**: `{llm}`", f"- **Template**: {template}",
                      f"- **Device**: {predictor.device} ({str(predictor.dtype).removeprefix('torch.')})"])


def message_text(content) -> str:
    """The text of a chat message's content (Gradio hands it over as a list of parts)."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in parts)


class Chat:
    """Answers one question about an image, given the conversation so far; bad input gives a message, not a trace."""

    def __init__(self, predictor: Predictor, max_pixels: int | None, seed: int = 0):
        self.predictor, self.max_pixels, self.seed = predictor, max_pixels, seed

    def reply(self, image: str | None, question: str | None, history: list[dict] | None, max_new_tokens: float,
              temperature: float) -> tuple[list[dict], str, str]:
        """(the conversation with the new turn, the question box's new value, the status line)."""
        history, question = list(history or []), (question or "").strip()
        if image is None:
            return history, question, "⚠️ Upload an image first."
        if not question:
            return history, "", "⚠️ Type a question about the image first."
        name = Path(image).name
        try:
            picture = load_image(Path(image), self.max_pixels)
        except ValueError as e:  # empty, or over the pixel cap
            return history, question, f"⚠️ {name}: {e}."
        except Exception as e:  # every decoder error reads the same way
            return history, question, f"⚠️ {name} is not an image this demo can read ({type(e).__name__})."
        turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": message_text(m["content"])} for m in history]
        turns.append({"from": "human", "value": question})
        start = time.perf_counter()
        torch.manual_seed(self.seed)  # sampling (temperature > 0) repeats for the same settings, as in revision.predict
        try:
            answer = self.predictor.answer(turns, picture, max_new_tokens=int(max_new_tokens), temperature=float(temperature))
        except ValueError as e:  # e.g. an embedding that turned NaN
            return history, question, f"⚠️ {e}"
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return history, "", f"Answered in {time.perf_counter() - start:.2f} s (turn {len(history) // 2} on this image)."


def build_page(predictor: Predictor, chat: Chat, examples: list[tuple[Path, str]], max_new_tokens: int,
               temperature: float) -> gr.Blocks:
    """The page: checkpoint header, image, conversation, question box, generation settings, examples."""
    # uploads land in Gradio's cache (GRADIO_TEMP_DIR): every hour, those older than a day are deleted
    with gr.Blocks(title="ReVision demo", analytics_enabled=False, delete_cache=(3600, 86400)) as page:
        gr.Markdown("## ReVision: ask a trained checkpoint about an image")
        gr.Markdown(describe(predictor), elem_id="checkpoint")
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(type="filepath", label="Image", sources=["upload"], elem_id="image", height=320)
                with gr.Accordion("Generation", open=True):
                    tokens = gr.Slider(1, 1024, value=max_new_tokens, step=1, label="max new tokens",
                                       elem_id="max_new_tokens")
                    heat = gr.Slider(0.0, 2.0, value=temperature, step=0.05, label="temperature (0: greedy)",
                                     elem_id="temperature")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation about this image", elem_id="chat", height=420)
                question = gr.Textbox(label="Question", placeholder="e.g. what colour is the object in the center?",
                                      elem_id="question", lines=1)
                with gr.Row():
                    ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
                    clear = gr.Button("New conversation", elem_id="clear")
                status = gr.Markdown(elem_id="status")
        if examples:
            gr.Examples([[str(path), text] for path, text in examples], inputs=[image, question],
                        label="Held-out examples of the embedded world (images the model never saw)")

        def ask(upload: dict | None, *rest):  # the upload as sent, unopened (see below)
            return chat.reply(upload and upload["path"], *rest)

        # preprocess=False: gr.Image would open the upload with PIL before `ask` runs, and a file that is not an
        # image would end as a bare "Error"; uploads are still checked and moved into Gradio's cache
        inputs, outputs = [image, question, chatbot, tokens, heat], [chatbot, question, status]
        ask_button.click(ask, inputs, outputs, api_name="ask", preprocess=False)
        question.submit(ask, inputs, outputs, api_visibility="private", preprocess=False)
        # a new image starts a new conversation: an answer never mixes two images
        for event in (image.change, clear.click):
            event(lambda: ([], ""), None, [chatbot, status], queue=False, api_visibility="private")
    return page
