"""Forms generated from a job's config schema: one component per option, in its group, advanced ones folded.

The mapping is by field name, never by position: a saved TOML fills the form, the form builds the
same config the CLI would, and a validation problem is shown under the field it concerns.
"""
from __future__ import annotations

import typing
from typing import Any

import gradio as gr

from loratrain.core.config import JobConfig, base_type, resolve_registry
from loratrain.core.errors import ConfigError, Problem

TRISTATE: dict[str, bool | None] = {"default": None, "true": True, "false": False}


def _tristate(value: bool | None) -> str:
    return next(k for k, v in TRISTATE.items() if v is value)


def _number(value: Any, tp: type) -> Any:
    """A typed-in number as int or float; text that is no number is passed on for the schema to name."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return int(number) if tp is int and number.is_integer() else number


def _choices(cfg_cls: type[JobConfig], name: str) -> list[str] | None:
    extra = cfg_cls.extra(name)
    if extra.get("choices"):
        return [str(c) for c in extra["choices"]]
    if extra.get("registry"):
        try:
            return resolve_registry(extra["registry"]).names()
        except ImportError:  # an optional extra is missing: free text, checked when the job starts
            return None
    return None


class Form:
    """The components of one config, created inside the current Blocks context by `render()`."""

    def __init__(self, cfg_cls: type[JobConfig], prefix: str, exclude: tuple[str, ...] = (), open_groups: tuple[str, ...] = (),
                 defaults: dict[str, Any] | None = None) -> None:
        self.cfg_cls, self.prefix = cfg_cls, prefix
        self.names = [n for n in cfg_cls.model_fields if n not in exclude]
        self.open_groups = open_groups
        self.defaults = {**{n: self._default(n) for n in self.names}, **(defaults or {})}
        self.components: dict[str, gr.Component] = {}
        self.groups: dict[str, gr.Accordion] = {}  # by group name, for a page that opens one (the model's family)

    def _default(self, name: str) -> Any:
        field = self.cfg_cls.model_fields[name]
        return field.get_default(call_default_factory=True)

    def help(self, name: str) -> str:
        return self.cfg_cls.model_fields[name].description or ""

    def info(self, name: str) -> str:
        """The help line under a field (with its allowed range); `field_updates` puts it back after a fix."""
        return self.components[name].info if name in self.components else self.help(name)

    def render(self) -> dict[str, gr.Component]:
        groups: dict[str, list[str]] = {}
        for name in self.names:
            groups.setdefault(self.cfg_cls.extra(name).get("group", "options"), []).append(name)
        for group, names in groups.items():
            basic = [n for n in names if not self.cfg_cls.extra(n).get("advanced")]
            advanced = [n for n in names if self.cfg_cls.extra(n).get("advanced")]
            with gr.Accordion(group, open=group in self.open_groups or len(groups) == 1,
                              elem_id=f"{self.prefix}-group-{group.lower().replace(' ', '-')}") as accordion:
                self.groups[group] = accordion
                self._fields(basic)
                if advanced:
                    with gr.Accordion("Advanced", open=False):
                        self._fields(advanced)
        return self.components

    def _fields(self, names: list[str]) -> None:
        """Fields wrap into columns on a wide screen; checkboxes get a row of their own."""
        flags = [n for n in names if base_type(self.cfg_cls.model_fields[n].annotation) == (bool, False)]
        for row in ([n for n in names if n not in flags], flags):
            if row:
                with gr.Row(equal_height=False):
                    for name in row:
                        self.components[name] = self._component(name)

    def _component(self, name: str) -> gr.Component:
        field = self.cfg_cls.model_fields[name]
        tp, optional = base_type(field.annotation)
        value = self.defaults.get(name)
        common: dict[str, Any] = {"label": name, "info": self.help(name), "elem_id": f"{self.prefix}-{name}", "min_width": 280}
        choices = _choices(self.cfg_cls, name)
        if tp is bool and optional:  # three states: unset means "decide from the model" (e.g. v_parameterization)
            return gr.Dropdown(list(TRISTATE), value=_tristate(value), **common)
        if tp in (int, float) and optional:  # a Number cannot be empty (the browser sends 0); empty text is unset
            return gr.Textbox(value="" if value is None else str(value), placeholder="unset", **common)
        if tp is bool:
            return gr.Checkbox(value=bool(value) if value is not None else False, **common)
        if tp in (int, float):
            # No minimum/maximum on the component: Gradio would refuse the whole event with an anonymous toast;
            # our own check names the field and shows every problem at once. The range is in the help instead.
            extra = {m.__class__.__name__: m for m in field.metadata}
            bounds = [f"{op} {getattr(extra[k], attr)}" for k, op, attr in
                      (("Ge", "≥", "ge"), ("Gt", ">", "gt"), ("Le", "≤", "le"), ("Lt", "<", "lt")) if k in extra]
            if bounds:
                common["info"] = f"{common['info']} ({', '.join(bounds)})"
            return gr.Number(value=value, precision=0 if tp is int else None, **common)
        if typing.get_origin(tp) is list:
            return gr.Textbox(value="\n".join(map(str, value or [])), lines=2, info=f"{self.help(name)} (one per line)",
                              label=name, elem_id=f"{self.prefix}-{name}", min_width=280)
        if choices:
            return gr.Dropdown(choices=choices, value=value, allow_custom_value=optional, **common)
        return gr.Textbox(value="" if value is None else str(value), **common)

    def inputs(self) -> list[gr.Component]:
        return [self.components[n] for n in self.names]

    def to_dict(self, values: list[Any]) -> dict[str, Any]:
        """Form values -> config values (empty optional numbers are unset, lists one item per line)."""
        out: dict[str, Any] = {}
        for name, value in zip(self.names, values):
            tp, optional = base_type(self.cfg_cls.model_fields[name].annotation)
            if typing.get_origin(tp) is list:
                value = [v.strip() for v in str(value or "").splitlines() if v.strip()]
            elif tp is bool and optional:
                value = TRISTATE.get(str(value), value)
            elif tp in (int, float):
                if value is None or str(value).strip() == "":
                    if optional:
                        value = None
                    else:
                        continue  # a cleared number keeps its default
                else:
                    value = _number(value, tp)
            elif value is None and tp is str:
                value = ""
            out[name] = value
        return out

    def to_values(self, data: dict[str, Any]) -> list[Any]:
        """Config values -> form values, in input order (what `to_dict` reads back unchanged)."""
        out = []
        for name in self.names:
            tp, optional = base_type(self.cfg_cls.model_fields[name].annotation)
            value = data.get(name, self.defaults.get(name))
            if typing.get_origin(tp) is list:
                value = "\n".join(map(str, value if isinstance(value, (list, tuple)) else [] if value in (None, "") else [value]))
            elif tp is bool and optional:
                value = _tristate(value)
            elif tp in (int, float) and optional:
                value = "" if value is None else str(value)
            out.append(value)
        return out

    def build(self, values: list[Any], check_ready: bool = False) -> tuple[JobConfig | None, list[Problem]]:
        """The config of these values and every problem (field errors; with check_ready also requirements)."""
        try:
            cfg = self.cfg_cls.build(self.to_dict(values), source="the form", check=False)
        except ConfigError as e:
            return None, e.problems
        problems = cfg.problems() + (cfg.requirements() if check_ready else [])
        return cfg, problems

    def field_updates(self, problems: list[Problem]) -> list[Any]:
        """Each field's help text again, or its problem in its place (so every error shows where it belongs)."""
        by_field: dict[str, list[str]] = {}
        for name, text in problems:
            by_field.setdefault(name, []).append(text)
        return [gr.update(info=("⚠ " + "; ".join(by_field[n])) if n in by_field else self.info(n)) for n in self.names]


def problems_markdown(problems: list[Problem]) -> str:
    if not problems:
        return ""
    return "**Fix these first:**\n\n" + "\n".join(f"- `{f}`: {t}" if f else f"- {t}" for f, t in problems)
