"""What the command lines share: options derived from a frozen dataclass, help that shows every
default as a user would type it, and values written back the same way.

A field becomes `--field-name`, with its help and choices from the field's metadata (`option`):
a bool becomes a `--X/--no-X` switch, a `tuple[str, ...]` an option given once per value, and a
tuple of numbers one comma-separated value. Standard library only, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import field


def option(default, help: str, choices: tuple | None = None):
    """A config field with its command-line help (and the values it may take)."""
    metadata = {"help": help} | ({"choices": choices} if choices else {})
    return field(default=default, metadata=metadata)


def typed(value: object) -> str:
    """`value` as a user types it: 1,2,1 for a tuple, 1e-05 for a float, on/off for a switch."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(typed(v) for v in value)
    return str(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every optional option's default after its help, as typed; none where it is empty."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if action.required or default in (None, "", (), []) or default is argparse.SUPPRESS:
            return action.help
        return f"{action.help} (default: {typed(default).replace('%', '%%')})"


def repeatable(config: type) -> set[str]:
    """The fields given once per value on the command line (`--data A --data B`)."""
    return {name for name, kind in typing.get_type_hints(config).items() if kind == tuple[str, ...]}


def _numbers(kind: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(value) for value in text.split(",") if value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None

    parse.__name__ = f"comma-separated {kind.__name__}s"
    return parse


def add_options(parser: argparse.ArgumentParser, config: type) -> None:
    """One option per field of the dataclass `config`."""
    types, many = typing.get_type_hints(config), repeatable(config)
    parsers = {int: int, float: float, str: str, tuple[float, ...]: _numbers(float),
               tuple[int, ...]: _numbers(int)}  # fmt: skip
    for item in dataclasses.fields(config):
        name, help = f"--{item.name.replace('_', '-')}", item.metadata["help"]
        choices = item.metadata.get("choices")
        if types[item.name] is bool:  # --no-X turns off what a --config file turns on
            switch = parser.add_argument(
                name, action=argparse.BooleanOptionalAction, default=item.default, help=help
            )
            switch.help = help  # Python < 3.13 appends its own "(default: False)"
        elif item.name in many:
            parser.add_argument(name, action="append", default=None, help=help, metavar="TEXT")
        else:
            kind = parsers[types[item.name]]
            parser.add_argument(
                name, type=kind, default=item.default, choices=choices, help=help,
                metavar=None if choices else ("N" if kind in (int, float) else "TEXT"),
            )  # fmt: skip


def check_choices(config: object) -> None:
    """A ValueError naming the option whose value is not one of its field's choices."""
    for item in dataclasses.fields(config):
        choices, value = item.metadata.get("choices"), getattr(config, item.name)
        if choices and value not in choices:
            flag = f"--{item.name.replace('_', '-')}"
            raise ValueError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value}")
