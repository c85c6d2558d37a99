"""What the command lines share: options derived from frozen dataclasses, help that shows every
default as a user would type it, values written back the same way, and mistakes named by option.

A field becomes `--field-name` (or `--FLAG`, where its metadata names one), with its help,
choices and argument group from the field's metadata (`option`): a bool becomes a `--X/--no-X`
switch (a field that is already a `no_X` a plain `--no-X`), a `tuple[str, ...]` an option given
once per value, a tuple of numbers one comma-separated value, a field without a default a
required option, and a field holding a dataclass that dataclass's options, which `build` puts
back together. Standard library only, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import MISSING, field

REQUIRED = MISSING  # option(REQUIRED, ...): a field without a default, an option to give


def option(
    default: object,
    help: str,
    choices: tuple | None = None,
    *,
    flag: str | None = None,
    group: str | None = None,
):
    """A config field with its command-line help, the values it may take, the option's name where
    it is not the field's, and the argument group it is listed in. A callable default is a
    factory, called for each config and parser (a default read from the environment)."""
    extra = {"choices": choices, "flag": flag, "group": group}
    metadata = {"help": help} | {key: value for key, value in extra.items() if value is not None}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
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


def _flag(item: dataclasses.Field) -> str:
    return "--" + item.metadata.get("flag", item.name.replace("_", "-"))


def flag(config: object, name: str) -> str:
    """The option that sets field `name` of the dataclass `config`."""
    return _flag(next(item for item in dataclasses.fields(config) if item.name == name))


def _numbers(kind: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(value) for value in text.split(",") if value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None

    parse.__name__ = f"comma-separated {kind.__name__}s"
    return parse


_PARSERS = {
    int: int,
    float: float,
    str: str,
    tuple[float, ...]: _numbers(float),
    tuple[int, ...]: _numbers(int),
}


def _dataclass(kind: object) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def add_options(parser: argparse.ArgumentParser, *configs: type) -> None:
    """One option per field of the dataclasses `configs`, in the argument groups their fields
    name (a field holding a dataclass names the group of that dataclass's fields)."""
    groups = {}

    def add(config: type, group: str | None) -> None:
        types, many = typing.get_type_hints(config), repeatable(config)
        for item in dataclasses.fields(config):
            kind, title = types[item.name], item.metadata.get("group", group)
            if _dataclass(kind):
                add(kind, title)
                continue
            if title is not None and title not in groups:
                groups[title] = parser.add_argument_group(title)
            _add_option(groups.get(title, parser), item, kind, item.name in many)

    for config in configs:
        add(config, None)


def _add_option(where, item: dataclasses.Field, kind: object, many: bool) -> None:
    name, help, choices = _flag(item), item.metadata["help"], item.metadata.get("choices")
    default = item.default if item.default_factory is MISSING else item.default_factory()
    if kind is bool:  # --no-X turns off what a --config file turns on
        action = "store_true" if name.startswith("--no-") else argparse.BooleanOptionalAction
        switch = where.add_argument(name, action=action, default=default, help=help, dest=item.name)
        switch.help = help  # Python < 3.13 appends its own "(default: False)"
        return
    if many:
        where.add_argument(name, action="append", help=help, dest=item.name, metavar="TEXT")
        return
    if type(None) in typing.get_args(kind):  # `int | None`: an int, or None where not given
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    kind = _PARSERS[kind]
    where.add_argument(
        name,
        type=kind,
        choices=choices,
        help=help,
        dest=item.name,
        required=default is MISSING,
        default=None if default is MISSING else default,
        metavar=None if choices else {int: "N", float: "N", str: "TEXT"}.get(kind, "N,..."),
    )


def build(config: type, values: dict):
    """The dataclass `config` from parsed options (`values` by field name, a nested dataclass
    from the same values); a ValueError names the option at fault."""
    types, many = typing.get_type_hints(config), repeatable(config)
    arguments = {}
    for item in dataclasses.fields(config):
        if _dataclass(types[item.name]):
            arguments[item.name] = build(types[item.name], values)
        elif item.name in many:
            arguments[item.name] = tuple(values[item.name] or item.default)
        else:
            arguments[item.name] = values[item.name]
    return config(**arguments)


def parse(parser: argparse.ArgumentParser, argv: list[str] | None, *configs: type) -> tuple:
    """The dataclasses `configs` from the command line; an invalid value is refused by name, as
    argparse refuses a mistake (usage and exit status 2)."""
    values = vars(parser.parse_args(argv))
    try:
        return tuple(build(config, values) for config in configs)
    except ValueError as error:
        parser.error(str(error))


def check_choices(config: object) -> None:
    """A ValueError naming the option whose value is not one of its field's choices."""
    for item in dataclasses.fields(config):
        choices, value = item.metadata.get("choices"), getattr(config, item.name)
        if choices and value not in choices:
            names = ", ".join(map(str, choices))
            raise ValueError(f"{_flag(item)} must be one of {names}, got {typed(value)}")


def check(config: object, rules: dict[str, tuple[bool, str]]) -> None:
    """A ValueError naming the option of the first rule broken, `--max-crop must be in [0, 1],
    got 2`: `rules` maps a field to (whether it is valid, the rule)."""
    for name, (valid, rule) in rules.items():
        if not valid:
            value = getattr(config, name)
            empty = isinstance(value, (str, tuple)) and not value
            shown = not (value is None or isinstance(value, bool) or empty)
            got = f", got {typed(value)}" if shown else ""
            raise ValueError(f"{flag(config, name)} {rule}{got}")
