"""`nanogpt-jax plot OUT_DIR [OUT_DIR ...] [--output=loss.png]`: loss, learning rate and tokens/s of runs,
and HellaSwag's accuracy where a run measured it.

Reads each run's metrics.jsonl (step records: iter, loss, lr, tokens_per_sec, ...; eval records: iter,
train_loss, val_loss; HellaSwag records: iter, hellaswag_acc, hellaswag_acc_norm) and draws them against the
iteration, one colour per run.
"""

from .config import UserError
from .tracking import read_metrics

# (record key, panel, line style): thin for the noisy per-step loss, markers for the evaluations
CURVES = (("loss", 0, dict(lw=0.8, alpha=0.4)), ("train_loss", 0, dict(ls="--", marker=".")),
          ("val_loss", 0, dict(marker="o", ms=3)), ("lr", 1, dict()), ("tokens_per_sec", 2, dict()),
          ("hellaswag_acc", 3, dict(ls="--", marker=".")), ("hellaswag_acc_norm", 3, dict(marker="o", ms=3)))
PANELS = ("loss", "learning rate", "tokens/s", "HellaSwag")


class PlotError(UserError):
    """Nothing to plot, or no way to draw it."""


def series(records: list[dict], key: str) -> tuple[list, list]:
    """(iterations, values) of the records that hold a number under `key` (nulls, e.g. mfu on CPU, are skipped)."""
    points = [(r["iter"], r[key]) for r in records if "iter" in r and isinstance(r.get(key), (int, float))]
    return [i for i, _ in points], [v for _, v in points]


def plot(out_dirs: list[str], output: str = "loss.png") -> str:
    """Draw the runs in out_dirs (labelled by folder) into the image `output`; returns its path."""
    if not out_dirs:
        raise PlotError("plot needs at least one run folder: nanogpt-jax plot OUT_DIR [OUT_DIR ...]")
    runs = {}
    for out_dir in out_dirs:
        records = read_metrics(out_dir)
        if not any(series(records, key)[0] for key, panel, _ in CURVES if panel == 0):
            raise PlotError(f"{out_dir}/metrics.jsonl has no loss record yet")
        runs[str(out_dir)] = records
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend; PNG goes through Agg
    except ImportError:
        raise PlotError("plot needs matplotlib: pip install 'nanogpt-jax[plot]' (or pip install matplotlib)") from None

    drawn = [p for p in range(len(PANELS))  # a panel only where some run has its records
             if p < 3 or any(series(r, key)[0] for r in runs.values() for key, panel, _ in CURVES if panel == p)]
    fig = Figure(figsize=(8, 3 * len(drawn)), dpi=100, layout="constrained")
    axes = dict(zip(drawn, fig.subplots(len(drawn), 1, sharex=True)))
    for n, (label, records) in enumerate(runs.items()):
        for key, panel, style in CURVES:
            iters, values = series(records, key)
            if iters:
                axes[panel].plot(iters, values, color=f"C{n % 10}", label=f"{label}: {key}", **style)
    for ax, name in ((axes[p], PANELS[p]) for p in drawn):
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    axes[drawn[-1]].set_xlabel("iteration")
    try:
        fig.savefig(output)
    except OSError as e:
        raise PlotError(f"cannot write {output} ({e.strerror or e})") from None
    return output


def main(argv: list[str]) -> None:
    """The command line: run folders, then an optional --output=FILE (any format matplotlib writes)."""
    output = "loss.png"
    out_dirs = []
    for arg in argv:
        if arg.startswith("--output="):
            output = arg.removeprefix("--output=")
        elif arg.startswith("--"):
            raise PlotError(f"plot: unknown argument {arg!r}; it takes run folders and --output=FILE")
        else:
            out_dirs.append(arg)
    print(f"wrote {plot(out_dirs, output)}")
