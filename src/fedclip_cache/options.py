"""Options declared once: a dataclass field carries its default and everything the command line, the pipelines and
the checks derive from it (help, flag, allowed values, bounds). ``FederateConfig`` (federated/config.py) and
``ExtractConfig`` / ``ModelSpec`` (cache/config.py) declare their options with :func:`option`.

Plain Python on purpose (no typer, no torch): the stages declare options, the CLI turns them into typer options.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, NamedTuple, Optional, Union


def option(default: Any = dataclasses.MISSING, help: Union[str, Callable[[], str]] = "", *,
           flag: Optional[str] = None, choices: Optional[tuple[str, ...]] = None,
           bounds: Optional[tuple[Any, Any]] = None, factory: Any = None, **more: Any):
    """A config field with everything the CLI, pipelines and checks derive from it, written once: its default (or
    ``factory``), help, CLI flag (default ``--field-name``, see :func:`flag_of`), allowed values and inclusive
    ``(low, high)`` bounds (``None``: no limit on that side). ``help`` may be a function, called when the help is
    shown (a registry-backed option lists what is registered then). ``more`` holds what one config adds for its
    own front ends (a grid alias for federate's sweeps; how the ``extract`` command takes a file, ...)."""
    meta = {"help": help, "flag": flag, "choices": choices, "bounds": bounds, **more}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    """The flag a user types for a declared field: its ``flag`` metadata, else ``--field-name``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


class Kind(NamedTuple):
    """What a field's annotation allows: ``base`` (int, float, str, bool, or a collection type such as list,
    tuple, Sequence), whether ``None`` is allowed too, and a collection's ``item`` type (else None)."""

    base: Any
    optional: bool
    item: Any = None


def field_kinds(cls: type) -> dict[str, Kind]:
    """The :class:`Kind` of every field of dataclass ``cls``, from its annotations."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        optional = type(None) in typing.get_args(t)
        if optional:
            t = next(a for a in typing.get_args(t) if a is not type(None))
        items = [a for a in typing.get_args(t) if a is not Ellipsis]
        out[f.name] = Kind(typing.get_origin(t) or t, optional, items[0] if items else None)
    return out


def show(value: Any) -> str:
    """A value as the user would type it: text quoted, a list of names joined by commas, a tuple of numbers
    joined by commas, anything else as Python prints it."""
    if isinstance(value, tuple):
        return ",".join(show(v) for v in value)
    if isinstance(value, list):
        return ",".join(map(str, value)) if all(isinstance(v, str) for v in value) else repr(value)
    return repr(value) if isinstance(value, str) else str(value)


def said(label: str, value: Any) -> str:
    """How the user wrote an option and its value, for the start of a one-line error: ``--batch-size 0``,
    ``--grid hidden=0``, ``p.toml: extract.batch_size = 'big'`` (a label ending in ``=`` or a space takes the
    value directly; a flag gets a space)."""
    return f"{label}{'' if label.endswith(('=', ' ')) else ' '}{show(value)}"


def named(label: str) -> str:
    """The option's name alone, for a message about the option rather than one value: ``--classes``,
    ``p.toml: extract.classes`` (the ``= `` a pipeline label ends with, dropped)."""
    return label.rstrip("= ")
