"""Issue 29: does conditioning help when the head has the paper's 7×7 tokens? Arms paired per seed, tables as they come.

Every arm is a row of ``scripts/benchmark.py`` (the same ``crossmetric train`` process, recipe, seeds, classes,
schedule and selection on validation; the test split embedded once per run) with the same extra arguments for all,
e.g. ``-- --image_size 112`` (lite0's stride-16 stage then gives the head 7×7 tokens). Unlike ``benchmark.py``, runs
go seed by seed (every arm of seed 0 first), and ``results.json`` / ``results.md`` are rewritten after each run, so a
session that ends early leaves a table of what ran, with the missing (arm, seed) pairs listed.

The arms (issue 29 item 2): head off; the head with its loss into the backbone at lambda 1 and 0.3 (the better on
validation, by the mean selected validation Recall@1 over the seeds that ran both, is the ``paper`` arm; later seeds
run only that lambda); the no-conditioning control at that lambda; today's default (detached head + top-16 list-wise
transfer, no stop rule) and the same transfer from the no-conditioning head. Floors: raw pixels and the starting
model of each seed (zero-shot, from the head-off runs).

Where CIA − no conditioning is not within noise once every seed has run both (its mean above two standard errors),
the issue asks for more; a form within noise stops there. ``--third_image`` then adds the random-third-image control
(the head conditioned on an image that is neither the query nor its partner) of each such form, and
``--confirm_seeds 3 4`` runs CIA and both controls of the form with the larger gap at those seeds too (5 seeds in
all), then head off at them.

    OMP_NUM_THREADS=1 python scripts/benchmark_token_count.py --dataset emoji --seeds 0 1 2 --workers 2 \
        --third_image --confirm_seeds 3 4 --output_dir outputs/tokens_7x7 \
        --results scripts/benchmark_results/emoji_cpu/token_count -- --image_size 112
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import METRICS, mean_std, paired, raw_pixel_metrics, train  # noqa: E402

LAMBDAS = {"cia": 1.0, "cia_lambda_0.3": 0.3}  # the head's loss into the backbone, lambda 1 and 0.3
SELF_AT = {"cia": "cia_query_self", "cia_lambda_0.3": "cia_query_self_lambda_0.3"}  # the control at that lambda
SHUFFLED_AT = {"cia": "cia_query_shuffled", "cia_lambda_0.3": "cia_query_shuffled_lambda_0.3"}  # a random third image
TRANSFER, TRANSFER_SELF = "cia_detach_distill_listwise_top16", "cia_query_self_detach_distill_listwise_top16"
TRANSFER_SHUFFLED = "cia_query_shuffled_detach_distill_listwise_top16"
PAIRS = (  # (label, arm, reference arm): the paired differences each table shows
    ("paper's head − head off", "paper", "baseline"),
    ("paper's head − no conditioning (same lambda)", "paper", "paper_self"),
    ("default (transfer) − head off", TRANSFER, "baseline"),
    ("default (transfer) − transfer from no conditioning", TRANSFER, TRANSFER_SELF),
    ("paper's head − random third image (same lambda)", "paper", "paper_shuffled"),
    ("default (transfer) − transfer from a random third image", TRANSFER, TRANSFER_SHUFFLED),
    ("no conditioning (same lambda) − head off", "paper_self", "baseline"),
    ("transfer from no conditioning − head off", TRANSFER_SELF, "baseline"),
    ("random third image (same lambda) − head off", "paper_shuffled", "baseline"),
    ("transfer from a random third image − head off", TRANSFER_SHUFFLED, "baseline"),
)


def summary(args: argparse.Namespace, row: str, seed: int) -> dict[str, Any] | None:
    path = args.output_dir / "runs" / f"{row}-seed{seed}" / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def choose_lambda(args: argparse.Namespace) -> tuple[str | None, list[int]]:
    """The lambda row with the better mean selected validation Recall@1 over the seeds that ran both (None: none
    did), and those seeds."""
    if args.lambda_row:  # fixed by the caller (chosen at another size): no lambda runs here
        return args.lambda_row, []
    seeds = [s for s in args.seeds if all(summary(args, row, s) for row in LAMBDAS)]
    if not seeds:
        return None, []
    scores = {row: sum(summary(args, row, s)["best"]["recall@1"] for s in seeds) / len(seeds) for row in LAMBDAS}
    return max(scores, key=lambda row: scores[row]), seeds


def plan(args: argparse.Namespace, seed: int) -> list[str]:
    """The rows of one seed, in order; the lambda arms wait for the choice made on the first seed."""
    transfer = [TRANSFER, TRANSFER_SELF] if "transfer" in args.forms else []  # CIA − control first: short budgets
    chosen, _ = choose_lambda(args)
    if "paper" not in args.forms:
        return [*transfer, "baseline"]
    if chosen is None:
        return [*transfer, "baseline", *LAMBDAS]  # both lambdas; the control follows once one is chosen
    return [*transfer, chosen, SELF_AT[chosen], "baseline"]  # both CIA − control pairs first


def forms_not_within_noise(args: argparse.Namespace) -> list[str] | None:
    """The forms (``paper``, ``transfer``) whose CIA − no conditioning (Recall@1, paired over ``--seeds``) is above
    two standard errors, the larger gap first; None until every seed has run both arms of both forms."""
    chosen = choose_lambda(args)[0]
    if chosen is None and "paper" in args.forms:
        return None
    pairs = {"paper": (chosen, SELF_AT.get(chosen)), "transfer": (TRANSFER, TRANSFER_SELF)}
    gaps = {}
    for form, (arm, control) in ((f, pairs[f]) for f in args.forms):
        found = [(summary(args, arm, s), summary(args, control, s)) for s in args.seeds]
        if not all(a and c for a, c in found):
            return None
        difference = paired([a["final"]["recall@1"] for a, _ in found], [c["final"]["recall@1"] for _, c in found])
        if difference["mean"] > 2 * difference["standard_error"]:
            gaps[form] = difference["mean"]
    return sorted(gaps, key=lambda form: -gaps[form])


def follow_up(args: argparse.Namespace) -> list[tuple[str, int]] | None:
    """The runs ``--third_image`` and ``--confirm_seeds`` add, in order (None: not decided yet)."""
    forms = forms_not_within_noise(args) if args.third_image or args.confirm_seeds else []
    if forms is None:
        return None
    chosen = choose_lambda(args)[0]
    arms = {"paper": (chosen, SELF_AT.get(chosen), SHUFFLED_AT.get(chosen)),
            "transfer": (TRANSFER, TRANSFER_SELF, TRANSFER_SHUFFLED)}  # fmt: skip
    runs = [(arms[f][2], s) for s in args.seeds for f in forms] if args.third_image else []
    if forms and args.confirm_seeds:
        runs += [(row, s) for s in args.confirm_seeds for row in arms[forms[0]]]
        runs += [("baseline", s) for s in args.confirm_seeds]
    return runs


def next_run(args: argparse.Namespace, claimed: set[tuple[str, int]]) -> tuple[str, int] | None:
    """The first (row, seed) in seed order that no worker has taken and whose lambda is known (None: nothing ready)."""
    for seed in args.seeds:
        rows = [row for row in plan(args, seed) if not (args.head_off_last and row == "baseline")]
        if (chosen := choose_lambda(args)[0]) is not None:
            if "paper" in args.forms:
                rows.append(SELF_AT[chosen])  # seed 0's control, once its lambda is chosen
        else:  # the first seed's lambdas first, so the choice comes early; later seeds run only the chosen one
            rows = [row for row in rows if row not in LAMBDAS]
            rows = [*LAMBDAS, *rows] if seed == args.seeds[0] else rows
        for row in rows:
            if (row, seed) not in claimed:
                return row, seed
    if args.head_off_last and (
        last := next((("baseline", s) for s in args.seeds if ("baseline", s) not in claimed), None)
    ):
        return last
    return next((run for run in follow_up(args) or [] if run not in claimed), None)


def running_elsewhere(args: argparse.Namespace) -> set[tuple[str, int]]:
    """The (row, seed) pairs a live ``crossmetric train`` process (another driver's, e.g. one stopped and started
    again) is running into this ``--output_dir``: not to be started twice, and counted against ``--workers``."""
    found = set()
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    runs = str(args.output_dir / "runs")
    for line in listing:
        words = line.split()
        if "crossmetric.cli" in words and "train" in words and runs in words and "--run_name" in words:
            name = words[words.index("--run_name") + 1]
            row, _, seed = name.rpartition("-seed")
            if seed.isdigit():
                found.add((row, int(seed)))
    return found


def run_queue(args: argparse.Namespace, extra: list[str], write: Any) -> None:
    """Runs every (row, seed) of the plan with ``--workers`` processes at once (each one thread: OMP_NUM_THREADS=1),
    rewriting the tables after each run; a worker with nothing ready waits for the lambda choice, and runs that a
    live process already makes (:func:`running_elsewhere`) are waited for, not started again."""
    claimed: set[tuple[str, int]] = set()
    lock, running = threading.Lock(), [0]

    def worker() -> None:
        while True:
            with lock:
                elsewhere = running_elsewhere(args) - claimed
                item = next_run(args, claimed | elsewhere) if running[0] + len(elsewhere) < args.workers else None
                if item is None and running[0] == 0 and not elsewhere:
                    return
                if item is not None:
                    claimed.add(item)
                    running[0] += 1
            if item is None:
                time.sleep(5)
                continue
            try:
                train(*item, args, extra)
            finally:
                with lock:
                    running[0] -= 1
                    write()

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def tabulate(args: argparse.Namespace, extra: list[str], started: float) -> dict[str, Any]:
    chosen, chosen_on = choose_lambda(args)
    arms = {"baseline": "baseline", TRANSFER: TRANSFER, TRANSFER_SELF: TRANSFER_SELF, **{r: r for r in LAMBDAS}}
    arms[TRANSFER_SHUFFLED] = TRANSFER_SHUFFLED
    if chosen:
        arms.update(paper=chosen, paper_self=SELF_AT[chosen], paper_shuffled=SHUFFLED_AT[chosen])
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    every_seed = [*args.seeds, *args.confirm_seeds]
    for arm, row in arms.items():
        runs[arm] = {s: found for s in every_seed if (found := summary(args, row, s)) is not None}
    rows = {}
    for arm, by_seed in runs.items():
        if not by_seed:
            continue
        seeds = sorted(by_seed)
        rows[arm] = {
            "row": arms[arm],
            "seeds": seeds,
            "median_step_seconds": [by_seed[s]["median_step_seconds"] for s in seeds],
            "head_tokens": next((n for n in by_seed[seeds[0]]["recipe"] if n.startswith("head tokens")), None),
            "validation_recall@1": [by_seed[s]["best"]["recall@1"] for s in seeds],
            **{m: [by_seed[s]["final"][m] for s in seeds] for m in METRICS},
        }
    zero = {}  # the starting model of each seed (the same for every arm of a seed: the head does not embed)
    for by_seed in runs.values():
        for s, found in by_seed.items():
            if found.get("zero_shot") and s not in zero:
                zero[s] = found["zero_shot"]
    zero = dict(sorted(zero.items()))
    differences = []
    for label, arm, reference in PAIRS:
        if arm not in runs or reference not in runs:
            continue
        common = sorted(set(runs[arm]) & set(runs[reference]))
        if common:
            pair = {"pair": label, "arm": arms[arm], "reference": arms[reference], "seeds": common}
            for m in ("recall@1", "map@r"):
                pair[m] = paired(
                    [runs[arm][s]["final"][m] for s in common], [runs[reference][s]["final"][m] for s in common]
                )
            differences.append(pair)
    transfer = [TRANSFER, TRANSFER_SELF] if "transfer" in args.forms else []
    expected = [(row, s) for s in args.seeds for row in ["baseline", *transfer]]
    paper, control = (chosen, SELF_AT[chosen]) if chosen else ("cia (chosen lambda)", "cia_query_self (same lambda)")
    if "paper" in args.forms:
        if not args.lambda_row:  # the first seed chooses lambda, the others run its row
            expected += [(row, args.seeds[0]) for row in LAMBDAS]
        expected += [(paper, s) for s in args.seeds[1 if not args.lambda_row else 0 :]]
        expected += [(control, s) for s in args.seeds]
    expected += follow_up(args) or []
    missing = [f"{row} seed {s}" for row, s in expected if summary(args, row, s) is None]
    return {
        "dataset": args.dataset,
        "extra_arguments": extra,
        "seeds": args.seeds,
        "lambda": {
            "chosen": chosen,
            "value": LAMBDAS.get(chosen),
            "chosen_on_validation_of_seeds": chosen_on,
            "fixed_by": args.lambda_note if args.lambda_row else None,
        },
        "forms": args.forms,
        "floors": {"raw_pixels": args.raw_pixels, "zero_shot": {m: [z[m] for z in zero.values()] for m in METRICS}},
        "zero_shot_seeds": sorted(zero),
        "rows": rows,
        "paired": differences,
        "forms_not_within_noise": forms_not_within_noise(args),  # None: not every seed has run both of each form
        "missing": missing,
        "wall_seconds": time.perf_counter() - started,
        "run_seconds": sum(  # each run once: "paper" and its lambda's row are the same runs
            found.get("wall_seconds", 0.0)
            for by_seed in {arms[a]: r for a, r in runs.items()}.values()
            for found in by_seed.values()
        ),
        "device": f"CPU ({os.cpu_count()} cores), one thread per run",
        "command": " ".join(sys.argv),
    }


def markdown(results: dict[str, Any]) -> str:
    def cell(values: list[float]) -> str:
        mean, std = mean_std(values)
        return f"{mean * 100:.2f} ± {std * 100:.2f}"

    lam = results["lambda"]
    chosen_on = f"seeds {', '.join(map(str, lam['chosen_on_validation_of_seeds'])) or '–'}"
    lines = [
        f"{results['dataset'].capitalize()} arms at `{' '.join(results['extra_arguments'])}`; mean ± std over the "
        f"seeds listed; lambda of the paper's head chosen on validation: {lam['chosen'] or 'not yet'} "
        f"({lam.get('fixed_by') or chosen_on}).",
        "",
        "| row | seeds | tokens | R@1 | MAP@R | R@1 per seed | validation R@1 | step s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| raw pixels | – | – | {results['floors']['raw_pixels']['recall@1'] * 100:.2f} | "
        f"{results['floors']['raw_pixels']['map@r'] * 100:.2f} | – | – | – |",
    ]
    zero = results["floors"]["zero_shot"]
    if zero["recall@1"]:
        lines.append(
            f"| zero-shot (starting model) | {', '.join(map(str, results['zero_shot_seeds']))} | – | "
            f"{cell(zero['recall@1'])} | {cell(zero['map@r'])} | "
            f"{', '.join(f'{v * 100:.1f}' for v in zero['recall@1'])} | – | – |"
        )
    for arm, row in results["rows"].items():
        if arm == "paper":
            continue  # the same runs as their lambda rows
        tokens = (row["head_tokens"] or "head off").removeprefix("head tokens: ").split(" per image")[0]
        lines.append(
            f"| {row['row']} | {', '.join(map(str, row['seeds']))} | {tokens} | {cell(row['recall@1'])} | "
            f"{cell(row['map@r'])} | {', '.join(f'{v * 100:.1f}' for v in row['recall@1'])} | "
            f"{cell(row['validation_recall@1'])} | {mean_std(row['median_step_seconds'])[0]:.3f} |"
        )
    lines += ["", "Paired per-seed differences (points), mean ± standard error:", ""]
    lines += ["| pair | seeds | R@1 | per seed | MAP@R | per seed |", "| --- | --- | --- | --- | --- | --- |"]
    for diff in results["paired"]:
        r, m = diff["recall@1"], diff["map@r"]
        lines.append(
            f"| {diff['pair']} ({diff['arm']} − {diff['reference']}) | {', '.join(map(str, diff['seeds']))} | "
            f"{r['mean'] * 100:+.2f} ± {r['standard_error'] * 100:.2f} | "
            f"{', '.join(f'{d * 100:+.1f}' for d in r['differences'])} | "
            f"{m['mean'] * 100:+.2f} ± {m['standard_error'] * 100:.2f} | "
            f"{', '.join(f'{d * 100:+.1f}' for d in m['differences'])} |"
        )
    forms = results["forms_not_within_noise"]
    if forms is not None:
        lines += ["", f"CIA − no conditioning above 2 s.e. over seeds {', '.join(map(str, results['seeds']))}: "
                  f"{', '.join(forms) or 'neither form (both within noise: the issue stops there)'}."]  # fmt: skip
    lines += ["", f"Not run (yet): {', '.join(results['missing']) or 'none'}."]
    lines.append(
        f"Time so far: {results['run_seconds'] / 3600:.1f} h of runs on "
        f"{results['device']}; this driver: {results['wall_seconds'] / 60:.1f} min."
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="emoji")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/tokens_7x7"))
    parser.add_argument("--results", type=Path, required=True, help="folder of results.json and results.md")
    parser.add_argument("--workers", type=int, default=1, help="runs at once (give each one thread)")
    parser.add_argument("--collect_only", action="store_true", help="tabulate what exists; train nothing")
    parser.add_argument(
        "--third_image", action="store_true", help="the random-third-image control of each form not within noise"
    )
    parser.add_argument(
        "--confirm_seeds", nargs="*", type=int, default=[], help="more seeds for the form with the larger gap"
    )
    parser.add_argument(
        "--forms", nargs="+", choices=["paper", "transfer"], default=["paper", "transfer"],
        help="the forms to run: the head's loss into the backbone (paper) and the detached head's transfer",
    )  # fmt: skip
    parser.add_argument(
        "--lambda_row", choices=sorted(LAMBDAS), default=None,
        help="fix the paper form's lambda (chosen at another size) instead of choosing it on the first seed",
    )  # fmt: skip
    parser.add_argument(
        "--lambda_note", default="fixed by --lambda_row", help="where the fixed lambda was chosen, for the tables"
    )
    parser.add_argument(
        "--head_off_last", action="store_true",
        help="run head off after every seed's CIA − control pairs (a short budget gets the pairs first)",
    )  # fmt: skip
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    # what benchmark.train() reads from its namespace
    args.rerun, args.export_all, args.head_row = False, False, TRANSFER
    started = time.perf_counter()
    previous = args.results / "results.json"  # the raw-pixel floor is seed-independent: computed once
    if previous.exists() and json.loads(previous.read_text())["dataset"] == args.dataset:
        args.raw_pixels = json.loads(previous.read_text())["floors"]["raw_pixels"]
    else:
        args.raw_pixels = raw_pixel_metrics(args.dataset, args.data_dir)

    def write() -> None:
        results = tabulate(args, extra, started)
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.results / "results.md").write_text(markdown(results) + "\n")

    write()
    if not args.collect_only:
        run_queue(args, extra, write)
    print((args.results / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
