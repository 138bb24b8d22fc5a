"""Issue 29 item 7: what the transfer's stop rules do on emoji, from the runs' logs, paired with the 5-seed tables.

Each run is ``crossmetric train --dataset emoji`` with the default transfer and ``--cia_distill_stop RULE``
(``head_no_better``: the rule acts; ``watch``: the same checks logged, the transfer goes on, so the run is the default
run bit for bit). For a ``watch`` run the table says, check by check, whether each rule would have fired; where none
would, the run *is* that rule's run. The head-off and default figures of the same seeds come from
``scripts/benchmark_results/emoji_cpu/head_pays/results.json`` (same recipe, same seeds). Writes results.json and
results.md.

    python scripts/transfer_stop_table.py --runs outputs/emoji_stop/runs \
        --output scripts/benchmark_results/emoji_cpu/transfer_stop
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "scripts/benchmark_results/emoji_cpu/head_pays/results.json"
RULES = ("head_no_better", "head_not_catching_up")


def read_run(folder: Path) -> dict[str, Any]:
    """A run's checks (from log.jsonl) and, when finished, its test and selection figures (summary.json)."""
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    checks = [{"step": r["step"], **r["transfer_check"]} for r in log if "transfer_check" in r]
    last_step = max((r["step"] for r in log if "loss" in r), default=0)
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else None
    return {"checks": checks, "last_step": last_step, "summary": summary}


def would_fire(checks: list[dict[str, Any]]) -> dict[str, int | None]:
    """The first step at which each rule fires along a watch run's checks (``training/transfer_gate.py``'s rules)."""
    fires: dict[str, int | None] = dict.fromkeys(RULES)
    previous = None
    for check in checks:
        lead = check["head_recall@1"] - check["embedding_recall@1"]
        if lead <= 0 and fires[RULES[0]] is None:
            fires[RULES[0]] = check["step"]
        if lead <= 0 and previous is not None and lead <= previous and fires[RULES[1]] is None:
            fires[RULES[1]] = check["step"]
        previous = lead
    return fires


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True, help="folder of RUN-seedS run folders")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    reference = json.loads(REFERENCE.read_text())
    seeds_of_reference = reference["seeds"]

    def reference_value(row: str, metric: str, seed: int) -> float:
        return reference["rows"][row][metric]["values"][seeds_of_reference.index(seed)]

    runs = {}
    for folder in sorted(p for p in args.runs.iterdir() if (p / "log.jsonl").exists()):
        match = re.fullmatch(r"(.+)_(stop|stop195|watch)-seed(\d+)", folder.name)
        if match:
            rule = {"stop": "head_no_better", "stop195": "head_not_catching_up", "watch": "watch"}[match.group(2)]
            runs[folder.name] = {"rule": rule, "seed": int(match.group(3)), **read_run(folder)}
    lines = [
        "Emoji, the default transfer (detached head, top-16 list-wise, weight 50) with the stop rules; head off and",
        "the default without a rule are the same seeds of `../head_pays/results.json`. Recall@1 / MAP@R on test,",
        "points. Where a rule fires in a watch run, it would have stopped the transfer there; where it never fires,",
        "the watch run is that rule's run. The watch run is the default of this session (checks change nothing:",
        "tests/test_transfer_gate.py); it differs a little from the earlier session's run of the same seed.",
        "",
        "| run | rule | seed | steps done | checks: step (head alone − embedding, validation R@1 over top 20) "
        "| head_no_better fires at | head_not_catching_up fires at | test R@1 | test MAP@R | − watch run R@1 / MAP@R "
        "| head off R@1 / MAP@R (earlier session) | default R@1 / MAP@R (earlier session) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in runs.items():
        checks = ", ".join(
            f"{c['step']} ({(c['head_recall@1'] - c['embedding_recall@1']) * 100:+.2f})" for c in run["checks"]
        )
        fires = would_fire(run["checks"]) if run["rule"] == "watch" else {run["rule"]: run["checks"][-1]["step"]}
        run["fires_at"] = fires
        final = run["summary"]["final"] if run["summary"] else None
        seed = run["seed"]
        off, default = (
            f"{reference_value(row, 'recall@1', seed) * 100:.2f} / {reference_value(row, 'map@r', seed) * 100:.2f}"
            for row in ("baseline", "cia_detach_distill_listwise_top16")
        )
        steps = run["summary"]["global_step"] if run["summary"] else f"{run['last_step']} (unfinished)"
        never = "no" if final else "not yet"
        other = "–" if run["rule"] != "watch" else never
        figures = f"{final['recall@1'] * 100:.2f} | {final['map@r'] * 100:.2f}" if final else "– | –"
        watch = runs.get(f"{name.rsplit('_', 1)[0]}_watch-seed{seed}", {}).get("summary")
        versus = "–"
        if final and watch and run["rule"] != "watch":
            versus = " / ".join(f"{(final[m] - watch['final'][m]) * 100:+.2f}" for m in ("recall@1", "map@r"))
        figures += f" | {versus}"
        lines.append(
            f"| {name} | {run['rule']} | {seed} | {steps} | {checks} | {fires.get(RULES[0]) or other} | "
            f"{fires.get(RULES[1]) or other} | {figures} | {off} | {default} |"
        )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(runs, indent=2) + "\n")
    (args.output / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
