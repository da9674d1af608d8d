"""One configuration mechanism for every node: a frozen dataclass drives flags, environment and defaults.

Guarantees:
- Sources, in order of precedence: the CLI flag, then the environment variable
  `PREFIX + FIELD_NAME` (upper case), then the dataclass default.
- `add_flags` derives one flag per field (`--field-name`, or the field's `metadata["flag"]`) with
  the field's `metadata["help"]`; flags default to "not given", so the environment can fill in.
  Reading the environment happens in `load`, never while building a parser, so a bad variable
  cannot break `--help`.
- A field whose metadata has `secret_env` names a file holding a secret (the variable named
  there may hold the secret itself). `add_flags` then also defines the flag without `-file`
  as a refusal: `--api-key VALUE` exits 2 without echoing the value, instead of argparse
  reading it as an abbreviation of `--api-key-file` (and quoting it in an error).
- `load` raises `ConfigError` naming the flag's field or the environment variable; the
  dataclass's own `__post_init__` errors (ValueError) are re-raised as `ConfigError` too. A CLI
  prints it as one line and exits with code 2.
- A leaf: imports only the standard library, so any runtime may use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad setting; the message names the field or the environment variable."""


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _base_type(hint: Any) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of a field's annotation."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    return hint, optional


def _converter(kind: type) -> Callable[[str], Any]:
    if kind is bool:
        return _parse_bool
    if kind in (int, float, str, Path):
        return kind
    raise TypeError(f"unsupported config field type {kind!r}")


def _fields(cls: type) -> list[tuple[dataclasses.Field, type, bool]]:
    hints = typing.get_type_hints(cls)
    return [(f, *_base_type(hints[f.name])) for f in dataclasses.fields(cls) if f.init]


def flag_name(f: dataclasses.Field) -> str:
    return str(f.metadata.get("flag", "--" + f.name.replace("_", "-")))


class RefuseSecret(argparse.Action):
    """A flag that would take a secret: exit 2 with a message that does not echo the value
    (`ps` shows a command line to every user)."""

    def __init__(self, *args: Any, instead: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.instead = instead

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string}: a secret never goes on the command line (other users see it in `ps`); "
                     f"use {self.instead}")


def refuse_secret_flag(parser: argparse.ArgumentParser, flag: str, instead: str) -> None:
    """A hidden `flag` that refuses any value (see RefuseSecret)."""
    parser.add_argument(flag, action=RefuseSecret, nargs="?", help=argparse.SUPPRESS, instead=instead)


def add_flags(parser: argparse.ArgumentParser, cls: type, *, env_prefix: str) -> None:
    """One flag per field of `cls`; each help line names its environment variable and default."""
    for f, kind, _ in _fields(cls):
        secret_env = f.metadata.get("secret_env")
        if secret_env is not None:
            name = flag_name(f)
            instead = f"{name} PATH" + (f" or {secret_env}" if secret_env else "")
            refuse_secret_flag(parser, name.removesuffix("-file"), instead)
        default = "required" if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING \
            else f"default {f.default!r}"
        text = f"{f.metadata.get('help', '')} [{env_prefix}{f.name.upper()}; {default}]".strip()
        if kind is bool:
            parser.add_argument(flag_name(f), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=text)
        else:
            parser.add_argument(flag_name(f), dest=f.name, type=_converter(kind), default=None, help=text,
                                metavar=f.name.upper())


def load(cls: type[T], args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None, *,
         env_prefix: str, **fallbacks: Any) -> T:
    """Build `cls` from flag > environment > `fallbacks` > default; raises ConfigError.

    `fallbacks` fill fields that neither a flag nor the environment set (for example a model
    folder found at run time) before the dataclass default applies.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f, kind, optional in _fields(cls):
        flag = getattr(args, f.name, None) if args is not None else None
        var = env_prefix + f.name.upper()
        if flag is not None:
            values[f.name] = flag
        elif environ.get(var, "") != "":
            text = environ[var]
            if optional and text.strip().lower() == "none":
                values[f.name] = None
                continue
            try:
                values[f.name] = _converter(kind)(text)
            except ValueError:
                raise ConfigError(f"{var}: not a valid {f.name}: {text!r}") from None
        elif fallbacks.get(f.name) is not None:
            values[f.name] = fallbacks[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{f.name}: required: give {flag_name(f)} or set {var}")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
