"""Config base: one dataclass per command, loaded from TOML and overridden by flags.

Flags are generated from the fields, so a field (with its sd-scripts name and help) is declared
once and the CLI, the TOML file and the UI all speak the same names.
"""
from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C", bound="CommandConfig")


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field with help text (and a default factory for mutable values)."""
    meta = {"help": help, **kw.pop("metadata", {})}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for `X | None` annotations."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


class ConfigError(ValueError):
    """A config value is wrong; the message names the field or file."""


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Parse a TOML file, turning a missing file or a syntax error into a ConfigError naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


@dataclasses.dataclass
class CommandConfig:
    @classmethod
    def field_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
        """Build from a flat or sectioned mapping (sd-scripts TOML files use sections freely)."""
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict) and key not in cls.field_types():
                flat.update(value)
            else:
                flat[key] = value
        known = cls.field_types()
        unknown = sorted(set(flat) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}")
        values = {k: _coerce(k, v, known[k], source) for k, v in flat.items()}
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @classmethod
    def from_toml(cls: type[C], path: str | Path) -> C:
        return cls.from_dict(read_toml(path), source=str(path))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field; defaults are suppressed so only flags given override the TOML."""
        parser.add_argument("--config_file", help="TOML file with any of the options below")
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.metadata.get("positional"):
                parser.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, help=f.metadata.get("help", ""))
                continue
            tp, _ = _base_type(cls.field_types()[f.name])
            help_text = f.metadata.get("help", "")
            kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
            if tp is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(tp) is list:
                kw["nargs"] = "+"
                kw["type"] = typing.get_args(tp)[0]
            else:
                kw["type"] = tp if tp in (int, float) else str
                if "choices" in f.metadata:
                    kw["choices"] = f.metadata["choices"]
            parser.add_argument(f"--{f.name}", **kw)

    @classmethod
    def from_args(cls: type[C], args: argparse.Namespace) -> C:
        data: dict[str, Any] = {}
        if getattr(args, "config_file", None):
            data = dataclasses.asdict(cls.from_toml(args.config_file))
        for name in cls.field_types():
            if name in vars(args):
                data[name] = vars(args)[name]
        return cls.from_dict(data, source="command line")

    def validate(self) -> None:
        """Cross-field checks; subclasses raise ConfigError naming the field."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: C, **changes: Any) -> C:
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new


def _coerce(name: str, value: Any, tp: Any, source: str) -> Any:
    inner, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {name} may not be empty")
    try:
        if inner is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if inner in (int, float, str):
            if inner is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return inner(value)
        if typing.get_origin(inner) is list:
            elem = typing.get_args(inner)[0]
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            return [elem(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name}={value!r} is not a valid {getattr(inner, '__name__', inner)}") from None
    return value
