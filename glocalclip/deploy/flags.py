"""Command-line flags made from a settings dataclass: one ``--name`` per field, its type from the
annotation (``Optional[X]`` -> X, ``bool`` -> a switch), its help from ``field(metadata={"help": ...})``,
so each setting is declared once."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _flag_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def add_flags(parser: argparse.ArgumentParser, settings: type) -> None:
    hints = typing.get_type_hints(settings)
    for f in dataclasses.fields(settings):
        kind = _flag_type(hints[f.name])
        if kind is bool:
            parser.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"])


def settings_from(args: argparse.Namespace, settings: type[T]) -> T:
    return settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(settings)})
