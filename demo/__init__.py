"""The embedded default world: procedural scenes, template captions and QA (`world`), a CLIP (`clip`) and an
LLM (`llm`) trained on them, and the pipeline that runs the real scripts on it (`pipeline`); `tiny`: the
random-weight CLIP / causal-LM builders the toy parts and the tests use.

Beside the library, not part of it: the wheel holds `revision` alone, and `revision` never imports `demo`
(tests/test_imports.py). Run it from a checkout's root (`python -m demo.pipeline ...`, as script/demo.sh and the
launchers do): its stages run that checkout's scripts (image_embed.py, script/train/*.sh; `--repo` names another)."""
from __future__ import annotations

import argparse
from dataclasses import fields, replace
from typing import Any, TypeVar

Config = TypeVar("Config")


def add_config_arguments(parser: argparse.ArgumentParser, defaults: Any, overrides_only: bool = False,
                         skip: tuple[str, ...] = ()) -> None:
    """One --FIELD option per field of the dataclass `defaults` but `skip` (its value the default; with
    overrides_only the default is None, meaning "keep the preset's")."""
    for f in (f for f in fields(defaults) if f.name not in skip):
        value = getattr(defaults, f.name)
        parser.add_argument(f"--{f.name}", type=_parse_bool if isinstance(value, bool) else type(value),
                            default=None if overrides_only else value,
                            help=f"override the preset's (default preset: {value})" if overrides_only else f"default {value}")


def config_from_arguments(args: argparse.Namespace, base: Config) -> Config:
    """`base` with every field that the command line set (not None)."""
    return replace(base, **{f.name: getattr(args, f.name) for f in fields(base) if getattr(args, f.name, None) is not None})


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")
