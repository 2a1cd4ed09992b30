"""Config base: one pydantic model per job, each option declared once.

A field carries its type, default, help, choices (or the registry its value must name), range,
group and an "advanced" mark. From that one declaration come the command-line flags, the TOML keys
and the UI form (via the JSON schema), so the three always speak the same names.

Values are merged first (TOML file, then flags over it) and validated once: type and range errors
of every field are reported together, each naming its field; then `problems()` adds the rules
that relate fields to each other and what a job needs before it may start.
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .errors import ConfigError, Problem

C = TypeVar("C", bound="JobConfig")


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Parse a TOML file, turning a missing file or a syntax error into a ConfigError naming it."""
    from .paths import confine

    path = confine(path, what)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder, not a TOML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: {what} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def parse_resolution(value: Any, what: str = "resolution", multiple: int = 8) -> tuple[int, int]:
    """`512`, `"512"`, `"768,512"`, `"768x512"` or `[768, 512]` -> (width, height), each side a multiple of `multiple`.

    The VAE halves a side three times, so sides that are not multiples of 8 silently lose pixels;
    they are refused with the nearest valid values instead of being trained on quietly.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what} {value!r} must be N or W,H")
    try:
        if isinstance(value, (int, float)):
            parts = [int(value)]
        elif isinstance(value, str):
            parts = [int(v) for v in value.lower().replace("x", ",").split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            parts = [int(v) for v in value]
        else:
            raise ValueError(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: inf, which a TOML float may be
        raise ConfigError(f"{what} {value!r} must be N or W,H") from None
    if len(parts) not in (1, 2):
        raise ConfigError(f"{what} {value!r} must be N or W,H")
    w, h = parts[0], parts[-1]
    for side in (w, h):
        if side < multiple or side % multiple:
            lo = max(multiple, side // multiple * multiple)
            raise ConfigError(f"{what} {value!r}: each side must be a positive multiple of {multiple} "
                              f"(the VAE works on {multiple}x{multiple} pixel blocks); nearest: {lo} or {lo + multiple}")
    return w, h


def opt(default: Any, help: str, *, choices: list[str] | tuple[str, ...] | None = None, registry: str | None = None,
        ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
        group: str = "", advanced: bool = False, positional: bool = False, flag: str | None = None,
        path: str | None = None) -> Any:
    """Declare one option.

    choices   the allowed values (static); registry: "module:NAME" of a Registry whose names are allowed,
              resolved lazily so declaring it imports nothing heavy
    ge/gt/le/lt  numeric range; group/advanced: where the UI shows it; positional: a CLI positional;
    flag      the CLI flag when it differs from the field name; path: "file", "dir", "output", "any", "state",
              "lora" (PATH:WEIGHT), "concept" (FOLDER=TOKENS): confined to the app's roots (core/paths.py);
              "name": one path component joined to a folder (no separator, no `..`), refused anywhere else
    """
    extra: dict[str, Any] = {"group": group or "options", "advanced": advanced}
    for key, value in (("choices", list(choices) if choices else None), ("registry", registry), ("positional", positional),
                       ("flag", flag), ("path", path)):
        if value:
            extra[key] = value
    kw: dict[str, Any] = {"description": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "json_schema_extra": extra}
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda d=default: type(d)(d), **kw)
    return Field(default=default, **kw)


def resolve_registry(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for `X | None` annotations."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _flatten(data: dict[str, Any], fields: set[str]) -> dict[str, Any]:
    """sd-scripts and the kohya GUI group TOML keys in sections freely; sections are not options."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in fields:
            flat.update(_flatten(value, fields))
        else:
            flat[key] = value
    return flat


def _describe(errors: list[dict[str, Any]]) -> list[Problem]:
    out: list[Problem] = []
    for err in errors:
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, ConfigError):  # raised by our own __init__ inside pydantic's validation: keep its fields
            out += inner.problems
            continue
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] != "value_error":
            msg = f"{err['input']!r}: {msg}" if err.get("input") is not None else msg
        out.append((field, msg))
    return out


class JobConfig(BaseModel):
    """Base of every job's options: one field per option, declared with `opt`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_default=False, coerce_numbers_to_str=True)

    #: bumped when a saved config needs a migration; written into saved TOML files
    SCHEMA_VERSION: ClassVar[int] = 1
    #: flags of another tool accepted on the command line (each takes any number of values)
    COMPAT_FLAGS: ClassVar[tuple[str, ...]] = ()
    _notes: list[str] = PrivateAttr(default_factory=list)

    def __init__(self, **data: Any) -> None:
        """Built in code, a bad value is the same ConfigError (every field named) as from a file or flags."""
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(problems=_describe(e.errors())) from None

    # ---- declared checks: choices and registry names, for every field at once --------------
    @field_validator("*", mode="before")
    @classmethod
    def _split_list_strings(cls, value: Any, info: Any) -> Any:
        """A TOML string given for a list option is split like a shell command line."""
        tp, _ = base_type(cls.model_fields[info.field_name].annotation)
        if typing.get_origin(tp) is list and isinstance(value, str):
            return shlex.split(value)
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _declared_checks(cls, value: Any, info: Any) -> Any:
        extra = cls.model_fields[info.field_name].json_schema_extra or {}
        if value is None or not isinstance(extra, dict):
            return value
        values = value if isinstance(value, list) else [value]
        if extra.get("path") == "name":
            from .paths import name_problem

            for v in values:
                problem = name_problem(v)
                if problem:
                    raise ValueError(problem)
        if extra.get("choices"):
            bad = [v for v in values if v not in extra["choices"]]
            if bad:
                raise ValueError(f"{bad[0]!r} is not one of: {', '.join(map(str, extra['choices']))}")
        if extra.get("registry"):
            registry = resolve_registry(extra["registry"])
            for v in values:
                if v not in registry:
                    raise ValueError(f"unknown {registry.kind} {v!r}; choose one of: {', '.join(registry.names())}")
        return value

    # ---- cross-field rules and readiness ----------------------------------------------------
    def problems(self) -> list[Problem]:
        """Rules between fields that any config of this job must satisfy; every problem, not just the first."""
        return []

    def requirements(self) -> list[Problem]:
        """What the job needs before it may start (required values, inputs that must exist)."""
        return []

    def check(self: C, ready: bool = True) -> C:
        """Raise one ConfigError listing every problem (and, when `ready`, every unmet requirement)."""
        problems = self.problems() + (self.requirements() if ready else []) + self._output_problems()
        if problems:
            raise ConfigError(problems=problems)
        return self

    def _output_problems(self) -> list[Problem]:
        """An output path below a plain file can never be created: say so instead of failing mid-job."""
        out = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if self.extra(name).get("path") == "output" and isinstance(value, str) and value:
                for parent in Path(value).expanduser().parents:
                    if parent.exists():
                        if not parent.is_dir():
                            out.append((name, f"{value}: {parent} is a file, not a folder"))
                        break
        return out

    # ---- building ---------------------------------------------------------------------------
    @classmethod
    def fields(cls) -> dict[str, Any]:
        return dict(cls.model_fields)

    @classmethod
    def extra(cls, name: str) -> dict[str, Any]:
        value = cls.model_fields[name].json_schema_extra
        return value if isinstance(value, dict) else {}

    @classmethod
    def unknown_keys(cls, keys: list[str], source: str) -> list[str]:
        """Keys a config file may hold that are not options; subclasses may accept (and log) some."""
        return keys

    @classmethod
    def build(cls: type[C], data: dict[str, Any], source: str = "config", check: bool = True) -> C:
        """Validate a flat or sectioned mapping: every field error at once, then (with check) `problems()`."""
        flat = _flatten(data, set(cls.model_fields))
        version = flat.pop("schema_version", cls.SCHEMA_VERSION)
        if not isinstance(version, int) or version > cls.SCHEMA_VERSION:
            raise ConfigError(f"{source}: schema_version {version!r} is newer than this loratrain understands "
                              f"({cls.SCHEMA_VERSION}); update loratrain")
        flat = cls.migrate(flat, version)
        flat, notes, problems = cls.compat(flat)
        unknown = cls.unknown_keys(sorted(set(flat) - set(cls.model_fields)), source)
        problems += [("", f"{source}: unknown option {k!r}") for k in unknown]
        for key in set(flat) - set(cls.model_fields):
            flat.pop(key)
        try:
            cfg = cls.model_validate(flat)
        except ValidationError as e:
            raise ConfigError(problems=problems + _describe(e.errors())) from None
        if problems:
            raise ConfigError(problems=problems)
        cfg._notes = notes
        return cfg.check(ready=False) if check else cfg

    @classmethod
    def compat(cls, flat: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[Problem]]:
        """Keys of another tool's config mapped to ours: (data, notes for the job's log, problems)."""
        return flat, [], []

    @property
    def notes(self) -> list[str]:
        """What building this config accepted without using (one line each), for the job to log."""
        return list(self._notes)

    @classmethod
    def compat_value(cls, values: list[str]) -> Any:
        """A compat flag's values as a TOML value: a bare switch is true, one value typed, several a list."""
        return values

    @classmethod
    def migrate(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """Bring a config saved under an older schema_version up to date (none yet)."""
        return data

    @classmethod
    def read_config_file(cls, path: str | Path) -> dict[str, Any]:
        """What `--config_file` holds, as a mapping (a job config may read more formats than TOML)."""
        return read_toml(path)

    @classmethod
    def from_toml(cls: type[C], path: str | Path, check: bool = True) -> C:
        return cls.build(cls.read_config_file(path), source=str(path), check=check)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, fixed: set[str] = frozenset()) -> None:
        """One flag per field (except `fixed` ones); defaults are suppressed so only flags given override the TOML."""
        parser.add_argument("--config_file", help="TOML file with any of the options below (flags override it)")
        for name, field in cls.model_fields.items():
            if name in fixed:
                continue
            extra = cls.extra(name)
            tp, _ = base_type(field.annotation)
            help_text = (field.description or "").replace("%", "%%")
            if extra.get("positional"):
                parser.add_argument(name, nargs="?", default=argparse.SUPPRESS, help=help_text)
                continue
            kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": name}
            if tp is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(tp) is list:
                kw["nargs"] = "+"
                kw["type"] = typing.get_args(tp)[0]
            else:
                kw["type"] = tp if tp in (int, float) else str
                if extra.get("choices"):
                    kw["choices"] = extra["choices"]
            parser.add_argument(f"--{extra.get('flag', name)}", **kw)
        for name in cls.COMPAT_FLAGS:
            if name not in cls.model_fields and name not in fixed and name != "config_file":
                parser.add_argument(f"--{name}", nargs="*", default=argparse.SUPPRESS, dest=f"compat__{name}",
                                    help=argparse.SUPPRESS)

    @classmethod
    def from_args(cls: type[C], args: argparse.Namespace, fixed: dict[str, Any] | None = None) -> C:
        """TOML (if --config_file) and flags merged first, then validated once."""
        data: dict[str, Any] = {}
        source = "command line"
        if getattr(args, "config_file", None):
            data = _flatten(cls.read_config_file(args.config_file), set(cls.model_fields))
            source = f"{args.config_file} + command line"
        given = vars(args)
        data.update({name: given[name] for name in cls.model_fields if name in given})
        data.update({key.removeprefix("compat__"): cls.compat_value(value) for key, value in given.items() if key.startswith("compat__")})
        data.update(fixed or {})
        return cls.build(data, source=source, check=False)  # the job checks everything at once, before any work

    # ---- saving -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def to_toml(self) -> str:
        """The config as a TOML file `--config_file` reads back (None values are left out: TOML has no null)."""
        import tomli_w

        data = {"schema_version": self.SCHEMA_VERSION}
        data.update({k: v for k, v in self.model_dump().items() if v is not None})
        return tomli_w.dumps(data)

    def replace(self: C, **changes: Any) -> C:
        return type(self).build({**self.model_dump(), **changes}, source="replace")
