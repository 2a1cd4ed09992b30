"""The face page's plan view, under the Train form: the plan's phases with their options and end rules, which phase
the model is in and since which iteration, and how each finished phase ended (docs/face-model.md#staged-plans).

It reads what `face train --plan` writes: the plan TOML named in the Train form's **plan** field and the plan
state beside the model (`<model_name>.plan_state.json`), plus the model file's header for its saved iteration.
A timer refreshes it while the page is open, so a phase change shows within seconds; unchanged text is not sent
again. The plan and model folder are resolved inside the workspace like any path the form takes.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gradio as gr

from loratrain.core.errors import ConfigError

from ..config import AppContext

HELP = ("A **plan** runs a recipe's stages in order, each with the options it changes and the rule that ends it "
        "(shipped ones: `configs/face_plans/`). Each switch pins a snapshot (`face snapshot list`); a stopped run "
        "resumes in its phase.")


#: Markdown punctuation that can start a link, image, code span, HTML tag, entity or table cell; backslash-escaped
#: (CommonMark) so text from the plan and its state files shows as written and cannot add markup
_MARKUP = re.compile(r"([\\`\[\]<>|&!#])")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _cell(text: Any) -> str:
    """Untrusted text as one line of literal Markdown (every file this view reads is untrusted)."""
    return _MARKUP.sub(r"\\\1", " ".join(str(text).split()))


def plan_markdown(plan_file: Path | None, model_dir: Path | None, model_name: str) -> str:
    """The view as Markdown: pure of the files it reads (tested without a browser)."""
    from loratrain.facetrain.train.plan import load_plan, read_state, saved_model_info

    if plan_file is None:
        return "no plan: set **plan** above to run staged phases (`configs/face_plans/` has the recipes' plans)"
    plan = load_plan(plan_file)
    state, iteration = None, None
    if model_dir is not None:
        from loratrain.core.paths import check_name

        name = check_name(model_name or "face", "model name")
        state = read_state(model_dir / f"{name}.plan_state.json")
        try:
            info = saved_model_info(model_dir / f"{name}.safetensors")
        except ValueError:
            info = {}
        iteration = info.get("iteration") if isinstance(info.get("iteration"), int) else None
    if state is not None and state.get("digest") != plan.digest and state.get("phase_name") not in {p.name for p in plan.phases}:
        state = None  # the model follows another plan
    ended = {t.get("phase"): t for t in (state or {}).get("transitions", []) if isinstance(t, dict)}
    current = None if state is None or state.get("done") else state.get("phase")
    lines = [f"### Plan: {_cell(plan.name)}", _cell(plan.description) if plan.description else ""]
    if state is None:
        lines.append("not started on this model" if model_dir is not None else "give the model folder to see its progress")
    elif state.get("done"):
        lines.append(f"**plan complete** (model at iteration {iteration})")
    elif isinstance(current, int) and current < len(plan.phases):
        phase = plan.phases[current]
        since = state.get("start")
        lines.append(f"**current: phase {current + 1}/{len(plan.phases)} — {_cell(phase.name)}** · since iteration "
                     f"{_cell(since) if since is not None else '?'} · saved at iteration {iteration if iteration is not None else '?'}"
                     f" · ends {_cell(phase.rule_text())}")
    lines += ["", "| # | phase | options | ends | status |", "|---|---|---|---|---|"]
    for p in plan.phases:
        t = ended.get(p.index)
        if t is not None and (current is None or p.index < current):
            snap = str(t.get("snapshot") or "")
            shown = f"`{snap}`" if _SAFE_NAME.match(snap) else _cell(snap)  # a code span cannot escape: names only
            status = f"done at iteration {_cell(t.get('iteration'))}" + (f" · snapshot {shown}" if snap else "")
        elif p.index == current:
            status = "▶ **running**"
        else:
            status = ""
        lines.append(f"| {p.index + 1} | {_cell(p.name)} | {_cell(p.options_text())} | {_cell(p.rule_text())} | {status} |")
    last = (state or {}).get("transitions", [])[-1:] if state else []
    if last and isinstance(last[0], dict):
        lines += ["", f"last switch: {_cell(str(last[0].get('reason', ''))[:400])}"]
    return "\n".join(lines)


class PlanView:
    """The Markdown box and its refresh (a timer and the plan field's changes)."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def render(self, components: dict[str, gr.Component]) -> None:
        """`components`: the Train form's components by option name (plan, model_dir, model_name)."""
        with gr.Accordion("Plan", open=True, elem_id="face-plan"):
            gr.Markdown(HELP)
            self.box = gr.Markdown(plan_markdown(None, None, ""), elem_id="face-plan-view")
            shown = gr.State("")
        inputs = [components[n] for n in ("plan", "model_dir", "model_name") if n in components]
        if len(inputs) != 3:
            return
        for c in inputs:
            c.change(self.show, inputs, [self.box], api_name=False, show_progress="hidden")
        timer = gr.Timer(2.0)
        timer.tick(self.tick, [*inputs, shown], [self.box, shown], show_progress="hidden", queue=False)

    def show(self, plan: str, model_dir: str, model_name: str) -> str:
        """The view for these form values, or one line saying what is wrong (never a traceback)."""
        try:
            plan_file = self.ctx.workspace.resolve(plan, "plan") if (plan or "").strip() else None  # type: ignore[attr-defined]
            folder = self.ctx.workspace.resolve(model_dir, "model folder") if (model_dir or "").strip() else None  # type: ignore[attr-defined]
            return plan_markdown(plan_file, folder, (model_name or "face").strip())
        except (ConfigError, OSError, ValueError) as e:
            return f"**{_cell(e)}**"

    def tick(self, plan: str, model_dir: str, model_name: str, shown: str) -> list[Any]:
        text = self.show(plan, model_dir, model_name)
        return [gr.skip(), shown] if text == shown else [text, text]
