"""The folders the app may read and write: every path a form gives must resolve inside one of them.

A path is resolved the way the job will open it (relative to the first root, `~` expanded, every
symlink followed), and refused unless the result lies inside a root: `../../etc/passwd`, an absolute
path elsewhere, a symlink pointing out and `file://` URLs all get a message instead of a file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loratrain.core import paths
from loratrain.core.config import JobConfig
from loratrain.core.errors import ConfigError, Problem
from loratrain.core.paths import split_spec


class Workspace:
    def __init__(self, roots: list[str | Path], denied: list[str | Path] = ()) -> None:
        if not roots:
            raise ConfigError("the app needs at least one workspace root")
        self.roots = [Path(r).expanduser().resolve() for r in roots]
        for root in self.roots:
            if not root.is_dir():
                raise ConfigError(f"workspace root {root} is not a folder")
        self.denied = [Path(os.path.realpath(d)) for d in denied]  # the app's own folders: inside a root, never a job's

    @property
    def home(self) -> Path:
        return self.roots[0]

    def resolve(self, value: str, what: str = "path") -> Path:
        """The absolute path `value` names, or a ConfigError when it lies outside every root (the rule jobs apply
        where they open files, core/paths.py, applied here too so a form shows the refusal next to its field)."""
        text = str(value).strip()
        with paths.confined(self.roots, self.denied, base=self.home):
            paths.confine(text, what)  # the one rule (core/paths.py), with this workspace's roots
        return paths.real(text, self.home)

    def is_model_name(self, value: str) -> bool:
        """`org/name` or `name` that is no file or folder of the workspace: a model name (e.g. a tagger's repo id),
        which loaders look up in the local Hugging Face cache, never a path (jobs run with the first root as
        their working folder, so a relative path always means one inside it)."""
        return paths.is_model_name(value, self.home)

    def contains(self, value: str) -> bool:
        try:
            self.resolve(value)
            return True
        except ConfigError:
            return False

    def files(self, suffixes: tuple[str, ...], limit: int = 2000) -> list[str]:
        """Files with these suffixes under the roots (hidden folders skipped), for pickers; relative to the first
        root where possible, so a picked value reads the same as a typed one."""
        out: list[str] = []
        for root in self.roots:
            for folder, dirs, names in os.walk(root):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if name.lower().endswith(suffixes):
                        path = Path(folder) / name
                        out.append(str(path.relative_to(self.home)) if self.home in path.parents else str(path))
                        if len(out) >= limit:
                            return out
        return out

    def describe(self) -> str:
        return ", ".join(str(r) for r in self.roots)

    def check_config(self, cfg_cls: type[JobConfig], values: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
        """The values with every path field resolved to an absolute path inside the workspace, and the refusals."""
        out, problems = dict(values), []
        for name in cfg_cls.model_fields:
            kind = cfg_cls.extra(name).get("path")
            value = values.get(name)
            if not kind or kind == "name" or value in (None, "", []) or (kind == "state" and value == "latest"):
                continue  # a name is checked as one path component by the config itself
            items = value if isinstance(value, list) else [value]
            resolved = []
            for item in items:
                if kind == "any" and self.is_model_name(str(item)):
                    resolved.append(str(item))  # a Hugging Face repo id or short name: looked up in the local cache only
                    continue
                try:
                    head, sep, tail = split_spec(str(item), kind)
                    resolved.append(str(self.resolve(head, name)) + sep + tail)
                except ConfigError as e:
                    problems.append((name, str(e).split(": ", 1)[1]))
            out[name] = resolved if isinstance(value, list) else (resolved[0] if resolved else value)
        return out, problems
