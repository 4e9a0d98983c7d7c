"""PNG pictures of benchmark JSON: passkey accuracy against length, decode latency and memory
against context length, accuracy of hkv and its peers. Needs matplotlib (``pip install "hkv[plot]"``), imported only here.

``hkv bench passkey|decode --png`` and ``python benchmarks/peers/run.py --png`` draw them after
a run; ``hkv bench plot FILE.json OUT.png`` redraws one from a saved JSON (the kind is read from its keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MISSING = 'plots need matplotlib: pip install "hkv[plot]"'


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(MISSING) from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def kind_of(figures: dict[str, Any]) -> str:
    """``passkey``, ``decode`` or ``peers``, from the keys of a benchmark's JSON; ValueError otherwise."""
    if "summary" in figures and "runs" in figures:
        return "passkey"
    if "contexts" in figures and "hkv_ms" in figures:
        return "decode"
    if "rows" in figures and "context_tokens" in figures:
        return "peers"
    raise ValueError("not the JSON of `hkv bench passkey`, `decode` or benchmarks/peers/run.py (expected summary/runs, contexts/hkv_ms or rows/context_tokens)")


def plot(figures: dict[str, Any], path: Path) -> Path:
    """Draw the picture for ``figures`` (any kind :func:`kind_of` knows) to ``path``."""
    draw = {"passkey": plot_passkey, "decode": plot_decode, "peers": plot_peers}[kind_of(figures)]
    return draw(figures, path)


def plot_peers(figures: dict[str, Any], path: Path) -> Path:
    """Bars of passkey accuracy per method, one bar per task (``benchmarks/peers/run.py``)."""
    plt = _pyplot()
    methods = list(dict.fromkeys(r["method"] for r in figures["rows"]))
    tasks = list(dict.fromkeys(r["task"] for r in figures["rows"]))
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(1, len(tasks))
    for t, task in enumerate(tasks):
        values = [next((100 * r["accuracy"] for r in figures["rows"] if r["method"] == m and r["task"] == task and r["accuracy"] is not None), 0)
                  for m in methods]  # fmt: skip
        ax.bar([i + t * width for i in range(len(methods))], values, width, label=task)
    ax.set_xticks([i + width * (len(tasks) - 1) / 2 for i in range(len(methods))], methods, rotation=30, ha="right")
    ax.set_ylabel("passkey accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{figures['context_tokens']} tokens, {figures['device_fraction']:.0%} of the KV on the device")
    ax.legend()
    return _save(fig, plt, path)


def plot_passkey(figures: dict[str, Any], path: Path) -> Path:
    """Accuracy (%) against prompt length (log 2 axis), one line per (variant, mode)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lines: dict[tuple[str, str], list[tuple[int, float, int]]] = {}
    for row in figures["summary"]:
        lines.setdefault((row["variant"], row["mode"]), []).append((row["length"], 100 * row["accuracy"], row["trials"]))
    for (variant, mode), points in lines.items():
        points.sort()
        label = mode if variant == "single" else f"{mode}, question in a later turn"
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", linestyle="-" if variant == "single" else "--", label=label)
        for n, acc, trials in points:
            ax.annotate(f"n={trials}", (n, acc), textcoords="offset points", xytext=(0, 5), fontsize=7, ha="center")
    trained = figures.get("meta", {}).get("trained_length")
    if trained:
        ax.axvline(trained, color="grey", linestyle=":", linewidth=1)
        ax.annotate("trained length", (trained, 4), fontsize=8, color="grey", rotation=90, ha="right")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-5, 105)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey accuracy (%)")
    ax.set_title("Passkey retrieval, SmolLM2-135M: hkv modes and full attention")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_decode(figures: dict[str, Any], path: Path) -> Path:
    """Two panels against context length: decode ms per token (hkv, DynamicCache where run) and
    memory (hkv peak RSS where measured, hkv device + host tier bytes, the full KV DynamicCache holds)."""
    plt = _pyplot()
    contexts = figures["contexts"]
    fig, (lat, mem) = plt.subplots(1, 2, figsize=(10, 4))
    _series(lat, contexts, figures.get("hkv_ms"), "hkv sparse", "o")
    _series(lat, contexts, figures.get("baseline_ms"), "DynamicCache (full)", "s")
    lat.set_ylabel("decode latency (ms / token)")
    gib = 1 << 30
    if figures.get("rss_peak_bytes"):
        _series(mem, contexts, [b / gib if b else None for b in figures["rss_peak_bytes"]], "hkv peak RSS", "o")
    ram = [(t["device"] + t["host"]) / gib for t in _tier_bytes(figures)] or None
    _series(mem, contexts, ram, "hkv KV in device + host tiers", "^")
    full = figures.get("kv_bytes") or [sum(t.values()) for t in _tier_bytes(figures)]  # hkv holds all of it, somewhere
    if full:
        _series(mem, contexts, [b / gib for b in full], "the whole KV (what DynamicCache holds in RAM)", "s")
    mem.set_ylabel("GiB")
    for ax in (lat, mem):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Decode: {figures.get('model', '')}, {figures.get('device', '')}")
    return _save(fig, plt, path)


def _tier_bytes(figures: dict[str, Any]) -> list[dict[str, int]]:
    """Bytes per tier per context: ``tier_bytes`` (million preset) or the ``tiers`` occupancy."""
    if figures.get("tier_bytes"):
        return figures["tier_bytes"]
    return [{name: use["used_bytes"] for name, use in tiers.items()} for tiers in figures.get("tiers") or []]


def _series(ax: Any, xs: list[int], ys: list[float | None] | None, label: str, marker: str) -> None:
    if not ys:
        return
    points = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)


def _save(fig: Any, plt: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
