"""One line at the end of a run that says whether the loss curve looks healthy, by rules of thumb that say so.

A diffusion loss is noisy (each step draws its own timesteps and noise) and often falls only a little while a LoRA
learns, so the line judges trends of windowed means, never single steps, and labels itself a rule of thumb: the
samples decide. Its numbers are named in the line so a user can weigh them.
"""
from __future__ import annotations

import math

#: share of the steps averaged at each end of the run to compare the start with the finish
WINDOW = 0.2
#: the end's mean above the start's by more than this share: rising (the learning rate is probably too high)
RISE = 0.10
#: the end's mean within this share of the start's: no clear fall
FLAT = 0.02
#: validation loss above its best by more than this share while the training loss kept falling: diverging
DIVERGE = 0.10
#: fewer steps than this say nothing about a trend
MIN_STEPS = 20


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def health_line(losses: list[float], val_losses: list[tuple[int, float]] | None = None) -> str:
    """The verdict on a run's step losses and (step, validation loss) pairs, with the numbers behind it."""
    head = "training health (rule of thumb):"
    bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    if bad is not None:
        return f"{head} the loss became {losses[bad]} at step {bad + 1}: lower the learning rate, or use bf16 / no mixed precision"
    if len(losses) < MIN_STEPS:
        return f"{head} {len(losses)} steps are too few to judge a trend (needs {MIN_STEPS}); look at the samples"
    n = max(1, int(len(losses) * WINDOW))
    first, last = _mean(losses[:n]), _mean(losses[-n:])
    change = (last - first) / first if first else 0.0
    trend = f"mean loss of the first {n} steps {first:.4g}, of the last {n} {last:.4g} ({change:+.0%})"
    parts = []
    if change > RISE:
        parts.append(f"rising: {trend}, more than +{RISE:.0%}; the learning rate is probably too high")
    elif abs(change) <= FLAT:
        parts.append(f"no clear fall: {trend}, within ±{FLAT:.0%}; usual for a diffusion loss, so judge by the samples, "
                     "and if they do not change either, raise the learning rate or the steps")
    else:
        parts.append(f"{'falling' if change < 0 else 'slightly rising'}: {trend}")
    pairs = val_losses or []
    vals = [v for _, v in pairs]
    if len(vals) >= 2:
        best_at = min(range(len(vals)), key=vals.__getitem__)
        best, now = vals[best_at], vals[-1]
        if best and (now - best) / best > DIVERGE and change <= 0:
            step = pairs[best_at][0]
            parts.append(f"validation diverging: {now:.4g} is {(now - best) / best:+.0%} over its best {best:.4g} (step {step}) "
                         f"while the training loss fell, more than +{DIVERGE:.0%}: overfitting; the save nearest step {step} "
                         "is likely the better one")
        else:
            parts.append(f"validation {vals[0]:.4g} -> {now:.4g} (best {best:.4g})")
    return f"{head} " + "; ".join(parts)
