"""Settings objects as command-line flags: one helper for the server's ``Settings`` and training's ``TrainConfig``.

    @dataclass(frozen=True)
    class Knobs:
        batch: int = option(32, "most items per forward pass")
        mode: str = option("fast", "how to run", choices=("fast", "exact"))

    add_flags(parser, Knobs)              # --batch BATCH, --mode {fast,exact}; each help ends with its default
    Knobs(**given(parser.parse_args(), Knobs))

A field's doc lives in its ``option(...)``, so ``--help`` and the code never disagree. Every flag defaults to
None, so a caller can tell "not given" from "given the default" and layer flags over presets or variables.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import Field, field, fields
from typing import Any

_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def option(
    default: Any, help: str, choices: tuple[str, ...] | None = None, flag: bool = True, repeat: bool = False
) -> Any:
    """A dataclass field with its one-line doc, its allowed values, and whether it becomes a flag. A ``repeat``
    flag may be given several times: its values are joined with commas, as its variable would list them."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "repeat": repeat})


def field_type(f: Field) -> type:
    """str, int, float or bool: the type a flag or an environment variable is parsed into."""
    name = f.type if isinstance(f.type, str) else f.type.__name__
    if name not in _TYPES:
        raise TypeError(f"field {f.name}: a flag needs a str, int, float or bool field, not {name}")
    return _TYPES[name]


def flag_fields(cls: type) -> list[Field]:
    return [f for f in fields(cls) if f.metadata.get("flag", True)]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def show(value: Any) -> str:
    return "on" if value is True else "off" if value is False else str(value)


def add_flags(parser: argparse.ArgumentParser, cls: type, env: Callable[[str], str] | None = None) -> None:
    """One flag per field of ``cls``; ``env(name)`` names the variable that also sets it, shown in the help."""
    for f in flag_fields(cls):
        kind = field_type(f)
        where = f"env {env(f.name)}; " if env else ""
        help = f"{f.metadata['help']} [{where}default {show(f.default)}]"
        if kind is bool:
            parser.add_argument(
                flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help
            )
        else:
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                type=kind,
                default=None,
                choices=f.metadata["choices"],
                help=help,
                **({"action": _Joined} if f.metadata.get("repeat") else {}),
            )


class _Joined(argparse.Action):
    """A repeated flag's values joined with commas (``--model a=x --model b=y`` is ``a=x,b=y``)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        earlier = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, values if earlier is None else f"{earlier},{values}")


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` set on the command line (flags left out are None and not returned)."""
    return {f.name: getattr(args, f.name) for f in flag_fields(cls) if getattr(args, f.name, None) is not None}


def check_choices(settings: Any) -> None:
    """ValueError naming the field when a value lies outside its declared choices."""
    for f in fields(settings):
        choices = f.metadata.get("choices")
        if choices and getattr(settings, f.name) not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {getattr(settings, f.name)!r}")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum``, refused as a usage error otherwise."""

    def integer(text: str) -> int:  # argparse names the type by __name__: "invalid integer value"
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return integer
