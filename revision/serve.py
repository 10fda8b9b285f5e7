"""Talk with a trained checkpoint about an image in the browser (a Gradio page; the `web` extra).

    python -m revision.serve --model CKPT [--host 127.0.0.1] [--port 7860] [--examples QUESTIONS.jsonl]

Upload an image (or pick an example), ask, ask again about the same image: the conversation is formatted with the
checkpoint's template and answered through revision.infer, as `python -m revision.predict` answers (greedy: the
same answer for the same image and question). One model in memory; requests queue and run one at a time.
The server listens on 127.0.0.1 only unless --host says otherwise (README: Web demo).
A checkpoint trained on the embedded world (script/demo.sh) offers held-out images and questions of its world
as examples; --examples names another question file (predict's format, images relative to the file).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from revision.errors import report
from revision.predict import add_loading_arguments, build_parser as predict_parser, load_predictor, read_questions

SERVE_MAX_PIXELS = 40_000_000  # 40 MP: any camera photo; a bigger upload is refused from its header, never decoded
MAX_FILE_SIZE = "100mb"  # Gradio turns bigger uploads away before they reach the disk


def find_examples(checkpoint: Path, given: str | None, count: int) -> list[tuple[Path, str]]:
    """Example (image, question) pairs: from --examples, else from the embedded world the checkpoint was trained
    on (script/demo.sh puts checkpoints in RUN/runs/ROW/stageN and the world in RUN/world)."""
    if given:
        path = Path(given)
    else:
        candidates = [folder / "world" / "eval_questions.jsonl" for folder in list(checkpoint.resolve().parents)[:3]]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return []
    rows = [q for q in read_questions(path) if q.get("image")]
    return [(path.parent / str(q["image"]), q["text"]) for q in rows[:count]]


def build_parser() -> argparse.ArgumentParser:
    predict = predict_parser()
    parser = argparse.ArgumentParser(prog="python -m revision.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (holds revision_config.json)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 lets anyone who reaches this machine use the model")
    parser.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    parser.add_argument("--examples", help="question file (JSONL: image, text) offered as examples (default: the "
                                           "embedded world's held-out questions, when the checkpoint comes from it)")
    parser.add_argument("--num_examples", type=int, default=6)
    parser.add_argument("--max_pixels", type=int, default=SERVE_MAX_PIXELS,
                        help="refuse uploaded images with more pixels (0: no cap)")
    parser.add_argument("--max_new_tokens", type=int, default=predict.get_default("max_new_tokens"),
                        help="the page's starting value (revision.predict's default)")
    parser.add_argument("--temperature", type=float, default=predict.get_default("temperature"),
                        help="the page's starting value; 0: greedy (revision.predict's default)")
    parser.add_argument("--seed", type=int, default=predict.get_default("seed"), help="for sampling (temperature > 0)")
    parser.add_argument("--queue_size", type=int, default=32, help="requests waiting at most; more are turned away")
    add_loading_arguments(parser.add_argument_group("loading (as revision.predict)"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        from revision import web
    except ImportError as e:
        return report(f"the web demo needs Gradio ({e}): pip install 'revision[web]'")
    try:
        predictor = load_predictor(args)
        predictor.encoder  # noqa: B018 (a property: loads it now: a checkpoint that cannot answer about images never serves)
        examples = find_examples(Path(args.model), args.examples, args.num_examples)
    except (ValueError, LookupError, OSError) as e:  # CheckpointError, a missing encoder, a bad example file: one line
        return report(e)
    chat = web.Chat(predictor, args.max_pixels or None, args.seed)
    page = web.build_page(predictor, chat, examples, args.max_new_tokens, args.temperature)
    page.queue(default_concurrency_limit=1, max_size=args.queue_size)  # one model: one request at a time
    try:
        _, url, _ = page.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, ssr_mode=False,
                                quiet=True, theme=web.THEME, footer_links=["api"], max_file_size=MAX_FILE_SIZE,
                                allowed_paths=sorted({str(image.parent) for image, _ in examples}))
    except OSError as e:  # the port is taken, the host is not this machine's
        return report(f"cannot listen on {args.host}:{args.port or 'a port from 7860'}: {e}")
    print(f"ReVision demo of {args.model} on {url} (Ctrl+C stops it)", flush=True)
    page.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
