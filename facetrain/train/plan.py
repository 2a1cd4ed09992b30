"""Staged training plans: a recipe's phases, each with the options it changes and the rule that ends it
(docs/face-model.md#staged-plans).

The recipes users follow are written as stages: "warp off until src_loss < 0.2, then colour transfer at 0.5
until src_loss < 0.3, then ...; back up before every switch". A plan file says that once; `face train --plan`
runs it, one `_train` run per phase, with a watcher that ends the phase on its rule. At each transition the
model is pinned as a snapshot (`phase-2-warp-off`) and the plan state (which phase, where it began) is written
atomically beside the model, so a stopped or killed run resumes in the same phase at its last saved iteration.

Each phase trains with the command line's options and its own over them, for that phase only: phases do not
inherit each other's options, so a phase reads as the whole of what it changes.

Plans are untrusted input: the file is size-bounded, every key is checked against an allow list, the loss rule
is parsed by a tiny grammar here (never eval'd), and every error names the file and the phase.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
import tomllib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratrain.core.errors import ConfigError
from loratrain.core.paths import confine
from loratrain.core.safe_io import atomic_write_json

from .config import FaceTrainConfig
from .watchers import Watcher

MAX_BYTES = 64 * 1024
MAX_PHASES = 32
MAX_CONDITIONS = 4
MAX_WINDOW = 10_000
MAX_ITERATIONS = 1_000_000_000
MAX_TRANSITIONS = 200
METRICS = ("src_loss", "dst_loss")
PHASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.,()+-]{0,59}$")
RULE_KEYS = ("name", "iterations", "until", "window", "hold", "likeness_patience", "max_iterations", "note")
ALIASES = {"warp": "random_warp"}  # the recipes' word for it
#: options a phase may not change: the model's shape is fixed at its first run
SHAPE = {"archi", "resolution", "face_type", "ae_dims", "e_dims", "d_dims", "d_mask_dims", "gan_dims", "gan_patch_size"}
#: settings of the run as a whole, given on the command line
RUN_ONLY = {"max_iters", "device", "workers", "quiet", "plan", "plan_restart", "model_name", "model_dir",
            "src_faceset", "dst_faceset", "pretrain_faceset"}


# ---------------------------------------------------------------- the loss rule


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str
    value: float

    def holds(self, avg: float) -> bool:
        return {"<": avg < self.value, "<=": avg <= self.value, ">": avg > self.value, ">=": avg >= self.value}[self.op]

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


_TOKEN = re.compile(r"\s*(?:(?P<metric>[a-z_]+)|(?P<op><=|>=|<|>)|(?P<num>[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9]+))")


@dataclass(frozen=True)
class LossRule:
    """`src_loss < 0.2`, `src_loss < 0.03 and dst_loss < 0.03`, `src_loss < 0.1 or dst_loss < 0.1`: conditions on
    the moving averages, joined by `and` / `or` (`and` binds tighter). Kept as OR of AND-groups."""

    text: str
    groups: tuple[tuple[Condition, ...], ...]

    @property
    def metrics(self) -> list[str]:
        return sorted({c.metric for g in self.groups for c in g})

    def holds(self, avgs: dict[str, float]) -> bool:
        return any(all(c.holds(avgs[c.metric]) for c in g) for g in self.groups)

    def figures(self, avgs: dict[str, float]) -> str:
        return ", ".join(f"{m} {avgs[m]:.4f}" for m in self.metrics if m in avgs)


def parse_rule(text: Any) -> LossRule:
    """The rule, or a ValueError saying what is wrong (the caller names the file and phase)."""
    if not isinstance(text, str):
        raise ValueError(f"until must be a string such as \"src_loss < 0.2\", not {text!r}")
    if len(text) > 200:
        raise ValueError("until is longer than 200 characters")
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text.rstrip()):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"until {text!r}: cannot read {text[pos:].strip()[:20]!r}")
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    groups: list[list[Condition]] = [[]]
    i = 0
    while True:
        if i + 3 > len(tokens) or [k for k, _ in tokens[i:i + 3]] != ["metric", "op", "num"]:
            raise ValueError(f"until {text!r}: expected METRIC < NUMBER (METRIC: {' or '.join(METRICS)}; "
                             "comparisons <, <=, >, >=; joined by and / or)")
        metric, op, num = (v for _, v in tokens[i:i + 3])
        if metric not in METRICS:
            raise ValueError(f"until {text!r}: unknown figure {metric!r} (use {' or '.join(METRICS)})")
        value = float(num)
        if not math.isfinite(value):
            raise ValueError(f"until {text!r}: {num} is not a finite number")
        groups[-1].append(Condition(metric, op, value))
        i += 3
        if i == len(tokens):
            break
        kind, word = tokens[i]
        if kind != "metric" or word not in ("and", "or"):
            raise ValueError(f"until {text!r}: expected 'and' or 'or' after {groups[-1][-1]}, found {word!r}")
        if word == "or":
            groups.append([])
        i += 1
    if sum(len(g) for g in groups) > MAX_CONDITIONS:
        raise ValueError(f"until {text!r}: at most {MAX_CONDITIONS} conditions")
    return LossRule(" ".join(text.split()), tuple(tuple(g) for g in groups))


# ---------------------------------------------------------------- the plan file


@dataclass
class Phase:
    index: int  # 0-based
    name: str
    options: dict[str, Any]
    iterations: int | None = None
    until: LossRule | None = None
    window: int = 100
    hold: int = 1
    likeness_patience: int | None = None
    max_iterations: int | None = None
    note: str = ""

    def rule_text(self) -> str:
        """The end rule in words (the log and the Face page show it)."""
        parts = []
        if self.iterations:
            parts.append(f"after {self.iterations} iterations")
        if self.until:
            held = f", held {self.hold} iterations" if self.hold > 1 else ""
            parts.append(f"when {self.until.text} (moving average over {self.window}{held})")
        if self.likeness_patience:
            parts.append(f"when likeness has not improved for {self.likeness_patience} checks")
        if self.max_iterations:
            parts.append(f"at the latest after {self.max_iterations} iterations")
        return "; or ".join(parts)

    def options_text(self) -> str:
        return ", ".join(f"{k} = {v}" for k, v in self.options.items()) or "(no changes)"


@dataclass
class Plan:
    path: Path
    name: str
    description: str
    digest: str
    phases: list[Phase]
    archi_kind: str = ""  # "df" or "liae" when the plan's options fit one kind only (its freezes name its parts)


def _int(where: str, key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where}: {key} must be a whole number from {lo} to {hi}, not {value!r}")
    return value


def phase_option_names() -> set[str]:
    """Every FaceTrainConfig option a phase may set: all except the model's shape, paths and run settings."""
    out = set()
    for name in FaceTrainConfig.model_fields:
        extra = FaceTrainConfig.extra(name)
        if name in SHAPE or name in RUN_ONLY or extra.get("path") or extra.get("positional"):
            continue
        out.add(name)
    return out


def _phase(where: str, raw: Any, index: int, default_window: int, allowed: set[str]) -> Phase:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a [[phase]] must be a table")
    name = raw.get("name")
    if not isinstance(name, str) or not PHASE_NAME.match(name):
        raise ConfigError(f"{where}: name must be 1-60 letters, digits, spaces or _ . , ( ) + - (got {name!r})")
    where = f"{where} ({name!r})"
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if key in RULE_KEYS:
            continue
        option = ALIASES.get(key, key)
        if option in SHAPE:
            raise ConfigError(f"{where}: {key} is the model's shape, fixed at its first run; a phase cannot change it")
        if option not in allowed:
            hint = " (give it on the command line: it applies to the whole run)" if option in FaceTrainConfig.model_fields else ""
            raise ConfigError(f"{where}: unknown option {key!r}{hint}")
        if option in options:
            raise ConfigError(f"{where}: {option} given twice ({key!r} is another name for it)")
        options[option] = value
    try:  # the values' types and ranges, with every problem named
        FaceTrainConfig.build(options, source=where, check=False)
    except ConfigError as e:
        raise ConfigError(problems=[("", f"{where}: {f + ': ' if f else ''}{m}") for f, m in e.problems]) from None
    phase = Phase(index, name, options, note=str(raw.get("note", ""))[:300])
    if "iterations" in raw:
        phase.iterations = _int(where, "iterations", raw["iterations"], 1, MAX_ITERATIONS)
    if "max_iterations" in raw:
        phase.max_iterations = _int(where, "max_iterations", raw["max_iterations"], 1, MAX_ITERATIONS)
    if "likeness_patience" in raw:
        phase.likeness_patience = _int(where, "likeness_patience", raw["likeness_patience"], 1, 1000)
    phase.window = _int(where, "window", raw.get("window", default_window), 1, MAX_WINDOW)
    phase.hold = _int(where, "hold", raw.get("hold", 1), 1, MAX_ITERATIONS)
    if "until" in raw:
        try:
            phase.until = parse_rule(raw["until"])
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    if not (phase.iterations or phase.until or phase.likeness_patience):
        raise ConfigError(f"{where}: give an end rule: iterations = N, until = \"src_loss < 0.2\" or likeness_patience = K")
    if phase.iterations and phase.max_iterations:
        raise ConfigError(f"{where}: iterations already ends the phase; max_iterations caps only an until or "
                          "likeness_patience rule")
    if ("window" in raw or "hold" in raw) and not phase.until:
        raise ConfigError(f"{where}: window and hold belong to an until rule")
    return phase


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan file; every error is a ConfigError naming the file (and the phase)."""
    path = confine(path, "plan")
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"plan not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"plan {path} is a folder, not a TOML file") from None
    except OSError as e:
        raise ConfigError(f"plan {path}: cannot read it ({e.strerror})") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{path}: a plan file is at most {MAX_BYTES // 1024} KiB")
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: a plan is UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except RecursionError:  # tomllib recurses once per nesting level: a deeply nested value exhausts the stack
        raise ConfigError(f"{path}: values are nested too deeply") from None
    unknown = sorted(set(raw) - {"name", "description", "window", "archi_kind", "phase"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (a plan holds name, description, window and [[phase]] tables)")
    phases = raw.get("phase")
    if not isinstance(phases, list) or not phases:
        raise ConfigError(f"{path}: no phases: add [[phase]] tables, each with a name, its options and an end rule")
    if len(phases) > MAX_PHASES:
        raise ConfigError(f"{path}: at most {MAX_PHASES} phases")
    window = _int(str(path), "window", raw.get("window", 100), 1, MAX_WINDOW)
    allowed = phase_option_names()
    out = [_phase(f"{path}: phase {i + 1}", p, i, window, allowed) for i, p in enumerate(phases)]
    names = [p.name for p in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"{path}: two phases are named {dup!r}; names tell the phases apart on resume")
    kind = raw.get("archi_kind", "")
    if kind not in ("", "df", "liae"):
        raise ConfigError(f"{path}: archi_kind must be \"df\" or \"liae\", not {kind!r}")
    name = raw.get("name", path.stem)
    return Plan(path, str(name)[:100], str(raw.get("description", ""))[:2000], hashlib.sha256(data).hexdigest(), out, kind)


def phase_config(base: FaceTrainConfig, plan: Plan, phase: Phase) -> FaceTrainConfig:
    """The options one phase trains with: the command line's, with the phase's over them (that phase only)."""
    data = {**base.model_dump(), **phase.options, "plan": ""}
    if data.get("pretrain") and base.pretrain_faceset:
        data["src_faceset"] = data["dst_faceset"] = base.pretrain_faceset
    try:
        return FaceTrainConfig.build(data, source=f"{plan.path}: phase {phase.index + 1} ({phase.name!r})", check=False).check()
    except ConfigError as e:
        where = f"{plan.path}: phase {phase.index + 1} ({phase.name!r})"
        raise ConfigError(problems=[("", f"{where}: {f + ': ' if f else ''}{m}") for f, m in e.problems]) from None


# ---------------------------------------------------------------- the plan state beside the model


def state_path(cfg: FaceTrainConfig) -> Path:
    return Path(cfg.model_dir) / f"{cfg.model_name}.plan_state.json"


MAX_STATE_BYTES = 256 * 1024  # 200 transitions with their reasons fit many times over
MAX_COUNT = 2 ** 62  # iterations and times beyond this are no run's: a planted or damaged file


def _whole(v: Any, hi: int = MAX_COUNT) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= hi


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= MAX_COUNT


def _short(v: Any, n: int) -> bool:
    return isinstance(v, str) and len(v) <= n


def _transition_ok(t: Any) -> bool:
    return (isinstance(t, dict) and _whole(t.get("phase"), MAX_PHASES) and _short(t.get("name", ""), 200)
            and _whole(t.get("iteration", 0)) and _short(t.get("reason", ""), 2000) and _short(t.get("snapshot", ""), 200)
            and (t.get("time") is None or _real(t["time"])))


def read_state(path: Path) -> dict | None:
    """The plan state, or None when there is none; a damaged one is an error naming the file (never guessed).

    The file is untrusted (the run and the app's plan view both read it): it is size-capped and every field's type
    and range is checked here, once, so no reader meets a list where a number belongs or a number too big to use."""
    again = "pass --plan_restart to start the plan again"
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"{path}: unreadable plan state ({e.strerror}); {again}") from None
    if len(data) > MAX_STATE_BYTES:
        raise ConfigError(f"{path}: a plan state is at most {MAX_STATE_BYTES // 1024} KiB; {again}")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: unreadable plan state ({str(e)[:200]}); {again}") from None
    ok = (isinstance(raw, dict) and _whole(raw.get("phase"), MAX_PHASES) and _short(raw.get("digest"), 128)
          and _short(raw.get("phase_name", ""), 200) and (raw.get("start") is None or _whole(raw["start"]))
          and isinstance(raw.get("transitions", []), list) and len(raw.get("transitions", [])) <= MAX_TRANSITIONS
          and all(_transition_ok(t) for t in raw.get("transitions", [])) and isinstance(raw.get("done", False), bool)
          and _short(raw.get("plan", ""), 4096) and _short(raw.get("plan_name", ""), 200)
          and (raw.get("updated") is None or _real(raw["updated"])))
    if not ok:
        raise ConfigError(f"{path}: not a plan state this version wrote; {again}")
    raw.setdefault("transitions", [])
    return raw


def write_state(path: Path, state: dict) -> None:
    state["transitions"] = state["transitions"][-MAX_TRANSITIONS:]
    state["updated"] = time.time()
    atomic_write_json(path, state)


def saved_model_info(path: Path) -> dict:
    """The saved model's info (iteration, pretrain, watchers) from the file's header, without loading weights."""
    if not path.is_file():
        return {}
    from safetensors import safe_open

    from .state import CONFIG_KEY

    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {})[CONFIG_KEY])
    except Exception as e:
        raise ValueError(f"{path}: unreadable model file ({e})") from None
    return info if isinstance(info, dict) else {}


# ---------------------------------------------------------------- the watcher of one phase


class PhaseWatcher(Watcher):
    """Ends its phase on the loss rule (moving averages over `window` iterations of this phase, true for `hold`
    iterations in a row) or when likeness stopped improving for `likeness_patience` checks. Its counts are saved
    in the model file, so a resumed phase goes on counting where the last save left it."""

    name = "plan"

    def __init__(self, plan: Plan, phase: Phase) -> None:
        self.plan, self.phase = plan, phase
        metrics = phase.until.metrics if phase.until else []
        self.values: dict[str, deque] = {m: deque(maxlen=phase.window) for m in metrics}
        self.held = 0
        self.best: float | None = None
        self.since_best = 0
        self.ended = ""

    def _label(self) -> str:
        return f"phase {self.phase.index + 1}/{len(self.plan.phases)} {self.phase.name!r}"

    def after_step(self, trainer: Any, logs: dict[str, float]) -> str | None:
        rule = self.phase.until
        if rule is None:
            return None
        for m, q in self.values.items():
            v = logs.get(m)
            if v is not None and math.isfinite(v):
                q.append(float(v))
        if any(len(q) < self.phase.window for q in self.values.values()):
            return None
        avgs = {m: sum(q) / len(q) for m, q in self.values.items()}
        self.held = self.held + 1 if rule.holds(avgs) else 0
        if self.held >= self.phase.hold:
            held = f", held {self.held} iterations" if self.phase.hold > 1 else ""
            self.ended = (f"{self._label()} ended: {rule.text} met ({rule.figures(avgs)}, moving average over "
                          f"{self.phase.window} iterations{held})")
            return self.ended
        return None

    def after_preview(self, trainer: Any, likeness: float | None, logs: dict[str, float]) -> str | None:
        patience = self.phase.likeness_patience
        if not patience or likeness is None or not math.isfinite(likeness):
            return None
        if self.best is None or likeness < self.best:  # an identity distance: lower is more like src
            self.best, self.since_best = likeness, 0
            return None
        self.since_best += 1
        if self.since_best >= patience:
            self.ended = (f"{self._label()} ended: likeness {likeness:.4f} has not improved on its best {self.best:.4f} "
                          f"for {self.since_best} checks")
            return self.ended
        return None

    def state(self) -> dict:
        return {"phase": self.phase.index, "phase_name": self.phase.name, "held": self.held,
                "values": {m: list(q) for m, q in self.values.items()}, "best": self.best,
                "since_best": self.since_best, "ended": self.ended}

    def restore(self, state: dict) -> None:
        if state.get("phase") != self.phase.index or state.get("phase_name") != self.phase.name:
            return  # another phase's counts
        for m, q in self.values.items():
            vals = (state.get("values") or {}).get(m) if isinstance(state.get("values"), dict) else None
            if isinstance(vals, list):
                q.extend(float(v) for v in vals[-self.phase.window:] if isinstance(v, (int, float)) and math.isfinite(v))
        for key in ("held", "since_best"):
            v = state.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                setattr(self, key, v)
        best = state.get("best")
        if isinstance(best, (int, float)) and not isinstance(best, bool) and math.isfinite(best):
            self.best = float(best)


# ---------------------------------------------------------------- running a plan


def _result_class() -> type:
    from .trainer import FaceTrainResult

    @dataclass
    class PlanResult(FaceTrainResult):
        """A plan run's result: the last phase's figures plus one line per transition (the CLI prints them)."""

        plan_lines: list[str] = field(default_factory=list)

        def summary(self) -> list[str]:
            return super().summary() + self.plan_lines

    return PlanResult


def run_plan(cfg: FaceTrainConfig, reporter: Any, stop: Any) -> Any:
    """Run (or resume) the plan `cfg.plan` on the model in `cfg.model_dir`; see the module docstring."""
    from ..snapshots import free_name, save_snapshot, slug
    from .trainer import _train

    PlanResult = _result_class()  # noqa: N806 (trainer.py imports torch: loaded only when a plan runs)
    plan = load_plan(cfg.plan)
    base = cfg.model_copy(update={"plan": ""})
    model_path = Path(cfg.model_dir) / f"{cfg.model_name}.safetensors"
    if plan.archi_kind:
        from ..models.archi import ArchSpec

        archi = (saved_model_info(model_path).get("model") or {}).get("archi") or cfg.archi
        if ArchSpec.parse(str(archi)).kind != plan.archi_kind:
            raise ConfigError(f"{plan.path}: this plan is for {plan.archi_kind.upper()} models; the model is {archi}")
    configs = [phase_config(base, plan, p) for p in plan.phases]  # every phase checked before any training
    spath = state_path(cfg)
    state = None if cfg.plan_restart else read_state(spath)
    n = len(plan.phases)
    if state is not None and state["digest"] != plan.digest:
        k = state["phase"]
        if k < n and plan.phases[k].name == state.get("phase_name"):
            reporter.log(f"note: the plan file changed since this model's plan began; going on in phase {k + 1} "
                         f"{plan.phases[k].name!r} (same name)")
        elif state.get("done"):
            state = None  # a finished plan; this is a new one
        else:
            raise ConfigError(f"{spath}: the model is in phase {k + 1} ({state.get('phase_name')!r}) of another plan; "
                              "pass --plan_restart to start this plan from its first phase")
    if state is not None and not state.get("done") and state["phase"] > n:
        raise ConfigError(f"{spath}: the model is in phase {state['phase'] + 1} of a {n}-phase plan; "
                          "pass --plan_restart to start this plan from its first phase")
    result = PlanResult(model_path=model_path if model_path.exists() else None, logs_dir=Path(cfg.model_dir) / "logs")
    if state is not None and state.get("done"):
        result.iteration = int(saved_model_info(model_path).get("iteration", 0))
        result.plan_lines.append(f"plan {plan.name!r} is complete; pass --plan_restart to run it again")
        reporter.log(f"plan {plan.name!r}: complete already (pass --plan_restart to run it again)")
        return result
    if state is None:
        state = {"plan": str(plan.path), "plan_name": plan.name, "digest": plan.digest, "phase": 0,
                 "phase_name": plan.phases[0].name, "start": None, "transitions": [], "done": False}
    state["digest"] = plan.digest
    reporter.log(f"plan {plan.name!r}: {n} phase(s); " + " -> ".join(p.name for p in plan.phases))
    while state["phase"] < n:
        i = state["phase"]
        phase, pcfg = plan.phases[i], configs[i]
        info = saved_model_info(model_path)
        saved_it = int(info.get("iteration", 0)) if isinstance(info.get("iteration", 0), int) else 0
        now = 0 if (info.get("pretrain") and not pcfg.pretrain) else saved_it  # the trainer resets it when pretraining ends
        if state.get("start") is None or state.get("phase_name") != phase.name:
            state.update(phase_name=phase.name, start=now)
            write_state(spath, state)
        start = state["start"]
        if start > now:  # the phase cannot have begun after the model's last save: a damaged or planted state
            raise ConfigError(f"{spath}: phase {i + 1} {phase.name!r} began at iteration {start}, after the model's "
                              f"saved iteration {now}; pass --plan_restart to start the plan again")
        watched = (info.get("watchers") or {}).get("plan") if isinstance(info.get("watchers"), dict) else None
        reason = ""
        if isinstance(watched, dict) and watched.get("phase") == i and watched.get("phase_name") == phase.name \
                and isinstance(watched.get("ended"), str) and watched["ended"]:
            reason = watched["ended"]  # ended at the last save, killed before the transition was written
        else:
            limit = phase.iterations or phase.max_iterations
            end = start + limit if limit else cfg.max_iters
            reporter.log(f"plan {plan.name!r}: phase {i + 1}/{n} {phase.name!r} from iteration {now} "
                         f"(began at {start}): {phase.options_text()}; ends {phase.rule_text()}")
            watcher = PhaseWatcher(plan, phase)
            got = _train(pcfg.model_copy(update={"max_iters": end}), reporter, stop, [watcher])
            result.history += got.history
            result.notes += got.notes
            result.iteration, result.model_path, result.preview_path = got.iteration, got.model_path, got.preview_path
            if got.stopped:
                result.stopped = True
                reporter.log(f"plan: stopped in phase {i + 1} {phase.name!r} at iteration {got.iteration}; run the same "
                             "command again to go on from there")
                return result
            if watcher.ended:
                reason = watcher.ended
            elif got.ended_by:  # another watcher's rule (early stopping): the plan waits, it does not move on
                reporter.log(f"plan: phase {i + 1} {phase.name!r} ended by {got.ended_by}; the plan stays in this phase")
                return result
            elif limit and got.iteration >= end:
                reason = (f"phase {i + 1}/{n} {phase.name!r} ended: {limit} iterations done"
                          + (" (its cap; the rule was not met)" if phase.max_iterations else ""))
            else:
                reporter.log(f"plan: --max_iters {cfg.max_iters} reached in phase {i + 1} {phase.name!r} before its "
                             f"end rule ({phase.rule_text()}); run again with a larger --max_iters to go on")
                result.plan_lines.append(f"plan stopped at --max_iters in phase {i + 1} {phase.name!r}")
                return result
        snap = ""
        if i + 1 < n:
            snap = free_name(Path(cfg.model_dir), f"phase-{i + 2}-{slug(plan.phases[i + 1].name)}")
            save_snapshot(cfg.model_dir, snap, cfg.model_name, note=f"before phase {i + 2} of plan {plan.name}: {reason}")
        it = int(saved_model_info(model_path).get("iteration", 0))
        state["transitions"].append({"phase": i, "name": phase.name, "iteration": it, "reason": reason,
                                     "snapshot": snap, "time": time.time()})
        state.update(phase=i + 1, phase_name=plan.phases[i + 1].name if i + 1 < n else "", start=None)
        write_state(spath, state)
        line = f"plan: {reason} at iteration {it}" + (f"; snapshot {snap} pinned; next: phase {i + 2} "
                                                       f"{plan.phases[i + 1].name!r}" if snap else "")
        reporter.log(line)
        result.plan_lines.append(line)
        result.ended_by = reason
    state["done"] = True
    write_state(spath, state)
    reporter.log(f"plan {plan.name!r}: complete")
    result.plan_lines.append(f"plan {plan.name!r} complete")
    return result
