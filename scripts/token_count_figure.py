"""Issue 29's figure: CIA − each control (Recall@1, points, ± standard error) against tokens per image.

One colour per form of the head: its loss into the backbone (the paper's way, against the controls at the same
lambda) and the default transfer (detached head + top-16 list-wise transfer, against the same transfer from the
control heads). Solid lines: against the no-conditioning control; dashed: against the random-third-image control
(where it has run). Each point is a paired per-seed difference on emoji's test split; the seeds behind each point
are printed beside it. Reads the committed benchmark tables, writes ``docs/token_count.png`` and a JSON of the points:

- 4×4 = 16 tokens (64 px, stride-16 stage): ``emoji_cpu/results.json`` (loss into the backbone, lambda 1, 5 seeds)
  and ``emoji_cpu/head_pays/results.json`` (transfer, 5 seeds);
- 5×5 = 25 tokens (80 px, emoji's stored size, stride-16 stage): ``emoji_cpu/token_count_5x5/results.json``
  (``benchmark_token_count.py --forms paper``, lambda fixed at the one chosen at 7×7), where it has run;
- 7×7 = 49 tokens (112 px, stride-16 stage): ``emoji_cpu/token_count/results.json`` (``benchmark_token_count.py``),
  whichever seeds have run.

    python scripts/token_count_figure.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from matplotlib.figure import Figure

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "benchmark_results" / "emoji_cpu"
FORMS = {"loss into the backbone (paper)": "paper", "transfer (default)": "transfer"}
CONTROLS = {"no conditioning": ("self", "-", "o"), "random third image": ("shuffled", "--", "s")}  # key, line, marker


def paired(values: list[float], reference: list[float]) -> dict[str, float | int]:
    differences = [100 * (v - r) for v, r in zip(values, reference)]
    spread = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else float("nan")
    return {"mean": statistics.fmean(differences), "standard_error": spread, "seeds": len(differences)}


def points_at_16() -> dict[str, dict]:
    """The 4×4 points, from the 5-seed tables of the earlier issues."""
    loss = json.loads((RESULTS / "results.json").read_text())["rows"]
    transfer = json.loads((RESULTS / "head_pays" / "results.json").read_text())["rows"]
    points = {}
    for control, _, _ in CONTROLS.values():
        points[f"paper_{control}"] = paired(
            loss["cia"]["recall@1"]["values"], loss[f"cia_query_{control}"]["recall@1"]["values"]
        )
        points[f"transfer_{control}"] = paired(
            transfer["cia_detach_distill_listwise_top16"]["recall@1"]["values"],
            transfer[f"cia_query_{control}_detach_distill_listwise_top16"]["recall@1"]["values"],
        )
    return points


def points_from(folder: str) -> dict[str, dict]:
    """The points of one size, from ``benchmark_token_count.py``'s paired differences (those that have run)."""
    path = RESULTS / folder / "results.json"
    wanted = {"paper's head − no conditioning (same lambda)": "paper_self",
              "default (transfer) − transfer from no conditioning": "transfer_self",
              "paper's head − random third image (same lambda)": "paper_shuffled",
              "default (transfer) − transfer from a random third image": "transfer_shuffled"}  # fmt: skip
    points = {}
    for pair in json.loads(path.read_text())["paired"] if path.exists() else []:
        if pair["pair"] in wanted:
            r = pair["recall@1"]
            se = r["standard_error"] * 100 if len(r["differences"]) > 1 else float("nan")
            points[wanted[pair["pair"]]] = {"mean": r["mean"] * 100, "standard_error": se, "seeds": len(pair["seeds"])}
    return points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=HERE.parent / "docs" / "token_count.png")
    args = parser.parse_args()
    by_tokens = {16: points_at_16(), 25: points_from("token_count_5x5"), 49: points_from("token_count")}
    by_tokens = {tokens: points for tokens, points in by_tokens.items() if points}
    figure = Figure(figsize=(6.4, 4.2), dpi=150)
    axes = figure.subplots()
    axes.axhline(0.0, color="grey", linewidth=0.8)
    lines = [(f"{form_label} − {control_label}", f"{form}_{control}", style, marker, colour)
             for colour, (form_label, form) in zip(("C0", "C1"), FORMS.items())
             for control_label, (control, style, marker) in CONTROLS.items()]  # fmt: skip
    seeds_at = {t: {p["seeds"] for p in points.values()} for t, points in by_tokens.items()}
    for offset, (label, form, style, marker, colour) in zip((-1.5, -0.5, 0.5, 1.5), lines):
        tokens = [t for t in by_tokens if form in by_tokens[t]]
        means = [by_tokens[t][form]["mean"] for t in tokens]
        errors = [0.0 if by_tokens[t][form]["standard_error"] != by_tokens[t][form]["standard_error"]
                  else by_tokens[t][form]["standard_error"] for t in tokens]  # fmt: skip
        axes.errorbar([t + offset for t in tokens], means, yerr=errors, marker=marker, capsize=4, label=label,
                      linestyle=style, color=colour, fillstyle="full" if marker == "o" else "none")  # fmt: skip
        for t, mean in zip(tokens, means):
            if len(seeds_at[t]) == 1:
                continue  # every point there has the same seeds: the tick label says how many
            seeds = by_tokens[t][form]["seeds"]
            text = f"{seeds} seeds" if seeds > 1 else "1 seed, no s.e. yet"
            axes.annotate(text, (t + offset, mean), textcoords="offset points",
                          xytext=(6, -4 if offset < 0 else 6), fontsize=6)  # fmt: skip
    ticks = {16: "4×4 = 16\n64 px\nλ = 1", 25: "5×5 = 25\n80 px\nλ = 0.3", 49: "7×7 = 49\n112 px\nλ = 0.3"}
    ticks = {tokens: text for tokens, text in ticks.items() if tokens in by_tokens}
    seeds_line = {t: f"\n{n} seed{'s' if n > 1 else ''}" for t in ticks if len(seeds_at[t]) == 1
                  for n in seeds_at[t]}  # fmt: skip
    axes.set_xticks(list(ticks), [text + seeds_line.get(t, "") for t, text in ticks.items()], fontsize=7)
    axes.set_xlim(8, 57)
    axes.set_xlabel("head tokens per image (lite0, stride-16 stage); λ: the weight of the head's loss", fontsize=8)
    axes.set_ylabel("CIA − control\nRecall@1 (points, ± s.e.)")
    axes.set_title("Emoji: does conditioning help with more tokens?", fontsize=10)
    low, high = axes.get_ylim()
    axes.set_ylim(low, high + 0.45 * (high - low))  # room above the points for the legend
    axes.legend(fontsize=6.5, loc="upper center", ncol=2)
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output)
    args.output.with_suffix(".json").write_text(json.dumps({str(t): p for t, p in by_tokens.items()}, indent=2))
    print(json.dumps(by_tokens, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
