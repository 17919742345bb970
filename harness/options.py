"""Command-line options from a configuration dataclass: declared once, in its fields.

Every field becomes ``--field-name``; its help is the field's ``metadata["help"]``, its
choices ``metadata["choices"]``, its type the annotation (``int | None`` also accepts
``none``; ``int | str`` tries int first; ``bool`` gets ``--x`` / ``--no-x``), and its
default the dataclass default, shown in the help beside the paper-scale preset when it
differs. Options the user does not give are absent from the parsed namespace, so :func:`config_from_args` can tell
them from a preset: the defaults, then the preset, then every option given.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, Field, field, fields, replace
from typing import Any, Callable, Iterable, Mapping

from harness.errors import InputError


def option(default: Any, help: str, choices: Iterable[Any] | None = None) -> Any:
    """A dataclass field whose metadata carries its command-line help (and choices)."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, metadata=metadata)


def _field_default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _members(annotation: Any) -> tuple[list[Any], bool]:
    """(the non-None types of ``annotation``, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = list(typing.get_args(annotation))
    else:
        members = [annotation]
    optional = type(None) in members
    return [m for m in members if m is not type(None)], optional


def _parser_for(name: str, members: list[Any], optional: bool) -> Callable[[str], Any]:
    scalars = [m for m in members if m in (int, float, str)]
    if not scalars:  # tuples and other containers: a comma-separated list of strings
        def parse_list(text: str) -> Any:
            if optional and text.lower() == "none":
                return None
            return tuple(part for part in text.split(",") if part)
        return parse_list
    ordered = sorted(scalars, key=(int, float, str).index)

    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        for kind in ordered:
            try:
                return kind(text)
            except ValueError:
                continue
        raise argparse.ArgumentTypeError(f"{text!r} is not {' or '.join(k.__name__ for k in ordered)}")

    parse.__name__ = " or ".join(k.__name__ for k in ordered)  # argparse names the type in its errors
    return parse


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def add_config_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config_type: type, *,
                       defaults: Any = None, presets: Mapping[str, Mapping[str, Any]] | None = None,
                       exclude: Iterable[str] = (), metavars: Mapping[str, str] | None = None) -> list[str]:
    """One option per field of the dataclass ``config_type`` (except ``exclude``); returns
    the field names added. ``defaults`` (an instance) overrides the shown defaults;
    ``presets`` (name -> field values, e.g. ``{"paper scale": {...}}``) are shown in the help."""
    hints = typing.get_type_hints(config_type)
    added = []
    for f in fields(config_type):
        if f.name in exclude or not f.init:
            continue
        default = getattr(defaults, f.name) if defaults is not None else _field_default(f)
        members, optional = _members(hints[f.name])
        text = f.metadata.get("help", "")
        shown = [f"default: {'none' if default is None else default}"]
        for preset_name, values in (presets or {}).items():
            if f.name in values and values[f.name] != default:
                value = values[f.name]
                shown.append(f"{preset_name}: {'none' if value is None else value}")
        help_text = f"{text.rstrip('.')} ({'; '.join(shown)})".strip().replace("%", "%%")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        if members == [bool]:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _parser_for(f.name, members, optional)
            if "choices" in f.metadata:
                kwargs["choices"] = list(f.metadata["choices"]) + ([None] if optional else [])
            if metavars and f.name in metavars:
                kwargs["metavar"] = metavars[f.name]
        parser.add_argument(flag(f.name), **kwargs)
        added.append(f.name)
    return added


def config_from_args(config: Any, args: argparse.Namespace, preset: Mapping[str, Any] | None = None) -> Any:
    """``config`` (a dataclass instance, e.g. the defaults), updated by ``preset``, then by
    every option given on the command line. Unknown preset fields raise ``InputError``."""
    names = {f.name for f in fields(config)}
    unknown = sorted(set(preset or {}) - names)
    if unknown:
        raise InputError(f"the preset names fields {unknown} that {type(config).__name__} does not have")
    config = replace(config, **(preset or {}))
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return replace(config, **given)
