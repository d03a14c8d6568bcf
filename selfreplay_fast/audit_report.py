"""The audit's verdict, table and plot, from the grid's cells (``audit_pilot.CellResult``).

The rule (``verdict``), stated once:

1. The reference is the plain run (replay weight 0) with the lowest held-out task loss: what the user would
   get without replay. Its drift ``D_ref`` is the drift to remove, its task loss ``T_ref`` the task loss to keep.
2. For every cell: ``drift_removed = 1 - drift / D_ref`` and ``task_cost = task_loss / T_ref - 1``.
3. Among the cells with ``task_cost <= max_task_cost`` the recommendation is the one that removes the most drift
   (ties: the lower task loss). If it removes at least ``min_drift_removed``, the verdict is ``"replay-works"``
   (``"low-lr-works"`` when the best such cell is itself a plain run at a lower learning rate).
4. Otherwise the verdict is ``"capacity-bound"``: no setting of the grid removes most of the drift at little
   task cost; the model has to forget to learn this task, and replay will not save the user. The cell that
   removes ``min_drift_removed`` at the least task cost (if any) says how large that cost is.
5. When ``D_ref`` is not above twice its standard error, plain fine-tuning does not drift measurably:
   ``"no-drift"``, the reference is the recommendation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

from .audit_pilot import CellResult


@dataclasses.dataclass
class Verdict:
    kind: str  # "replay-works", "low-lr-works", "capacity-bound" or "no-drift"
    message: str
    reference: str  # the key of the reference plain cell
    recommended: Optional[str]  # the key of the recommended cell (None when capacity-bound)
    cheapest_fix: Optional[str]  # capacity-bound: the cell removing min_drift_removed at least task cost
    max_task_cost: float
    min_drift_removed: float


def reference_cell(cells: List[CellResult]) -> CellResult:
    plain = [c for c in cells if c.plain]
    if not plain:
        raise ValueError("replay_weights: the grid needs weight 0 (the plain runs every other cell is judged against)")
    return min(plain, key=lambda c: (c.task_loss, c.learning_rate))


def task_cost(cell: CellResult, reference: CellResult) -> float:
    return cell.task_loss / reference.task_loss - 1.0


def drift_removed(cell: CellResult, reference: CellResult) -> float:
    return 1.0 - cell.drift / reference.drift if reference.drift > 0 else math.nan


def verdict(cells: List[CellResult], *, max_task_cost: float = 0.01, min_drift_removed: float = 0.8) -> Verdict:
    ref = reference_cell(cells)
    base = dict(reference=ref.key(), max_task_cost=max_task_cost, min_drift_removed=min_drift_removed)
    stderr = ref.drift_stderr if math.isfinite(ref.drift_stderr) else 0.0
    if not ref.drift > max(2 * stderr, 1e-9):
        return Verdict("no-drift", f"plain fine-tuning at lr {ref.learning_rate:g} does not drift measurably "
                       f"(drift {ref.drift:.3g} ± {stderr:.2g} nats/token): replay is not needed",
                       recommended=ref.key(), cheapest_fix=None, **base)
    affordable = [c for c in cells if task_cost(c, ref) <= max_task_cost]
    best = max(affordable, key=lambda c: (drift_removed(c, ref), -c.task_loss))  # the reference is affordable
    removing = [c for c in cells if drift_removed(c, ref) >= min_drift_removed]
    cheapest = min(removing, key=lambda c: (task_cost(c, ref), c.drift)) if removing else None
    if drift_removed(best, ref) >= min_drift_removed:
        kind = "low-lr-works" if best.plain else "replay-works"
        how = "without replay" if best.plain else f"with replay weight {best.replay_weight:g}" + (
            "" if best.replay_loss == "kl" else f" ({best.replay_loss} replay)")
        message = (f"recommended: learning rate {best.learning_rate:g} {how}: removes {drift_removed(best, ref):.0%} of "
                   f"plain fine-tuning's drift at {task_cost(best, ref):+.1%} task loss "
                   f"(reference: plain, lr {ref.learning_rate:g})")
        return Verdict(kind, message, recommended=best.key(), cheapest_fix=None, **base)
    message = (f"capacity-bound: no setting removes {min_drift_removed:.0%} of the drift within {max_task_cost:+.1%} "
               f"task loss (best within it: {drift_removed(best, ref):.0%} removed). The model has to forget to learn "
               "this task; replay will not save you")
    if cheapest is not None:
        message += (f"; removing {drift_removed(cheapest, ref):.0%} costs {task_cost(cheapest, ref):+.1%} task loss "
                    f"(lr {cheapest.learning_rate:g}, replay weight {cheapest.replay_weight:g})")
    return Verdict("capacity-bound", message, recommended=None,
                   cheapest_fix=cheapest.key() if cheapest is not None else None, **base)


def format_table(cells: List[CellResult], decision: Verdict, *, before_task_loss: Optional[float] = None) -> str:
    ref = next(c for c in cells if c.key() == decision.reference)
    lines = ["| learning rate | replay weight | task loss | task cost | drift (nats/token) | drift removed | |",
             "|---|---|---|---|---|---|---|"]
    if before_task_loss is not None:
        lines.append(f"| (original) | - | {before_task_loss:.4f} | - | 0 | - | |")
    for c in sorted(cells, key=lambda c: (c.learning_rate, c.replay_weight, c.replay_loss)):
        note = ("reference" if c.key() == decision.reference else "") + (
            " **recommended**" if c.key() == decision.recommended else "")
        weight = f"{c.replay_weight:g}" + ("" if c.plain or c.replay_loss == "kl" else f" ({c.replay_loss})")
        se = f" ± {c.drift_stderr:.2g}" if math.isfinite(c.drift_stderr) else ""
        lines.append(f"| {c.learning_rate:g} | {weight} | {c.task_loss:.4f} | {task_cost(c, ref):+.1%} | "
                     f"{c.drift:.4f}{se} | {drift_removed(c, ref):.0%} | {note.strip()} |")
    return "\n".join(lines + ["", f"verdict ({decision.kind}): {decision.message}"])


def plot_tradeoff(cells: List[CellResult], decision: Verdict, path: str) -> Optional[str]:
    """Task loss against drift, one curve per learning rate through its replay weights; plain runs marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for lr in sorted({c.learning_rate for c in cells}):
        row = sorted((c for c in cells if c.learning_rate == lr and c.replay_loss in ("kl", "none")),
                     key=lambda c: c.replay_weight)
        line, = ax.plot([c.drift for c in row], [c.task_loss for c in row], marker="o", ms=4, label=f"lr {lr:g}")
        for c in row:
            if not c.plain:
                ax.annotate(f"λ={c.replay_weight:g}", (c.drift, c.task_loss), textcoords="offset points",
                            xytext=(4, 3), fontsize=7, color=line.get_color())
        plain = [c for c in row if c.plain]
        ax.scatter([c.drift for c in plain], [c.task_loss for c in plain], marker="s", s=70, facecolors="none",
                   edgecolors="black", zorder=3, label="plain (no replay)" if lr == min(c.learning_rate for c in cells) else None)
    chosen = [c for c in cells if c.key() == decision.recommended]
    if chosen:
        ax.scatter([chosen[0].drift], [chosen[0].task_loss], marker="*", s=220, color="gold", edgecolors="black",
                   zorder=4, label="recommended")
    ax.set_xlabel("drift from the original model (replay KL, nats/token, held-out replay)")
    ax.set_ylabel("task loss (held-out, nats/token)")
    ax.set_title(f"audit: {decision.kind}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
