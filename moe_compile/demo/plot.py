"""The demo's loss curve (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations


def loss_curve(history: dict, baseline: list[float] | None, steps: range, path: str) -> None:
    """Train loss at every step and the held-out loss over every run in ``history`` (resumed runs continue the
    curve; a dotted line marks each resume), and this run's plain DDP train loss when it ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    train = history["train"]
    ax.plot([s + 1 for s, _ in train], [v for _, v in train], lw=1.5, color="tab:blue", label="train (moe_compile)")
    if baseline is not None:  # this run's steps only; it usually lies on the line above
        ax.plot([s + 1 for s in steps], baseline, lw=0.8, color="black", ls=(0, (3, 3)),
                label="train (plain DDP, same batches, this run)")
    if history["eval"]:
        ax.plot(*zip(*history["eval"]), "o-", ms=4, color="tab:green", label="held-out (moe_compile)")
    for run in history["runs"][1:]:
        ax.axvline(run["start"], color="gray", ls=":", lw=1)
        ax.text(run["start"], ax.get_ylim()[1], f" resumed, {run['nproc']} proc", va="top", fontsize=8,
                color="gray")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_title("moe-compile demo: byte-level MoE transformer on Shakespeare")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
