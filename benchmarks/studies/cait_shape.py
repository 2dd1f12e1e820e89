"""Does choosing the merge schedule's concentration on calibration images pay off on held-out ones?

For each method and FLOPs target, ``compress_cait``'s choice is replayed: every candidate
concentration is planned for the target and scored (mean KL to the unmerged model) on the same
seeded 256 *train* images the CLI would use, and the lowest is chosen. Every candidate is then
scored on the CIFAR-10 *test* split (never used to choose): agreement and KL with the unmerged
model, and top-1. A second table gives the choice alone for the token targets of the ATME+CDCP
rows of ``benchmarks/cait.py`` (the square root of their speed-up targets).

    .venv/bin/python benchmarks/studies/cait_shape.py

Writes ``--out`` (shape.md) with its data beside it: ``shape.json`` (both tables' rows and the
machine), ``shape.csv`` (the first table) and ``shape-cdcp.csv`` (the second).

ATME here is its first, fixed-lattice reading (``merge="atme-lattice"``), the one the recorded results
were measured with; ``atme_variants.py`` compares it with today's ATME.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import common
import torch
from common import Column

import vitslim
from vitslim.adapters import describe
from vitslim.cait.patch import apply_token_merging, remove_token_merging
from vitslim.cait.schedule import predicted_speedup, schedule_for_speedup
from vitslim.cait.shape import CHOICE_IMAGES, CONCENTRATIONS, choice_batches, choose_concentration
from vitslim.io import image_batches
from vitslim.measure.metrics import ClassificationScore

CDCP_TARGETS = (2.2, 2.4, 2.6, 3.0, 3.4)
METHOD_NAMES = {"atme-lattice": "ATME", "tome": "ToMe"}
COLUMNS = (Column("target", "target", "{:g}x"), Column("method", "method"), Column("concentration", "concentration", "{:g}"),
           Column("chosen", "chosen", lambda chosen: "**yes**" if chosen else ""), Column("calibration_kl", "calibration KL", "{:.4f}"),
           Column("schedule", "schedule (block, r, level)"), Column("flops_speedup", "FLOPs speed-up", "{:.2f}x"),
           Column("test_agreement", "test agreement", "{:.2%}"), Column("test_kl", "test KL", "{:.4f}"), Column("test_top1", "test top-1", "{:.2%}"))
# the choice alone for the ATME+CDCP targets: calibration KL per candidate concentration
KL_COLUMNS = tuple(Column(f"calibration_kl_{c:g}", f"calibration KL at {c:g}", "{:.4f}") for c in CONCENTRATIONS)
CDCP_COLUMNS = (Column("target", "target S", "{:g}x"), Column("token_target", "token target", "{:.3f}x"), Column("chosen", "chosen", "{:g}"),
                *KL_COLUMNS)
CDCP_MARKDOWN = (*CDCP_COLUMNS[:3], Column("calibration_kl", "calibration KL per concentration",
                                           lambda kl: ", ".join(f"{c:g}: {value:.4f}" for c, value in kl.items())))


def _score(model, batches, reference) -> dict:
    spec = describe(model)
    score = ClassificationScore(len(reference[0][0][0]))
    with torch.no_grad():
        for (images, labels), (teacher_logits, _) in zip(batches, reference):
            score.update(spec.output(images), labels, teacher_logits)
    return score.result()


def main() -> None:
    parser = common.argument_parser(__doc__)
    common.add_reference_arguments(parser)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.3, 1.45, 1.6, 2.0, 2.4])
    parser.add_argument("--test-images", type=int, default=None, help="test images scored (default: the whole split)")
    parser.add_argument("--out", default=str(common.RESULTS / "cait" / "shape.md"))
    args = parser.parse_args()

    model = vitslim.load_model(args.model)
    spec = describe(model)
    train = common.open_split(spec, args.train)
    test = common.open_split(spec, args.test)
    if args.test_images:
        test = image_batches.select(test, limit=args.test_images, seed=0)
    batches = [(images, labels) for images, labels, _ in image_batches.make_loader(test, 250)]
    with torch.no_grad():
        reference = [(spec.output(images), labels) for images, labels in batches]
    original = _score(model, batches, reference)

    def choose(method: str, target: float) -> tuple[float, dict[float, float]]:
        # compress_cait's own choice: the same seeded subset of the training images (seed 0)
        return choose_concentration(model, method, target, choice_batches(train, CHOICE_IMAGES, 0), progress=False)

    rows = []
    for target in args.targets:
        for method in ("atme-lattice", "tome"):
            chosen, calibration_kl = choose(method, target)
            for concentration in CONCENTRATIONS:
                schedule = schedule_for_speedup(spec, method, target, concentration=concentration)
                apply_token_merging(model, schedule, record=False)
                result = _score(model, batches, reference)
                remove_token_merging(model)
                rows.append({"target": target, "method": METHOD_NAMES[method], "concentration": concentration, "chosen": concentration == chosen,
                             "calibration_kl": calibration_kl[concentration], "schedule": common.steps_text(method, schedule.steps),
                             "flops_speedup": predicted_speedup(spec, schedule), "test_agreement": result["agreement"], "test_kl": result["kl"],
                             "test_top1": result["top1"]})
                print(f"{target} {method} c={concentration:g}{' chosen' if concentration == chosen else ''}: calibration KL "
                      f"{calibration_kl[concentration]:.4f}, test top-1 {100 * result['top1']:.2f}%, KL {result['kl']:.4f}", flush=True)
    cdcp = []
    for speedup in CDCP_TARGETS:
        token_target = math.sqrt(speedup)
        chosen, calibration_kl = choose("atme-lattice", token_target)
        cdcp.append({"target": speedup, "token_target": token_target, "chosen": chosen, "calibration_kl": calibration_kl,
                     **{column.key: calibration_kl[c] for column, c in zip(KL_COLUMNS, CONCENTRATIONS)}})

    command = common.rerun(parser, args)
    lines = [
        *common.heading(
            "Merge schedule concentration, chosen on train images, scored on test images",
            f"Command: {command}. vit-d6-cifar10, float32. "
            f"The choice: mean KL to the unmerged model on {CHOICE_IMAGES} seeded CIFAR-10 *train* images (what `compress_cait` and "
            f"`vitslim compress --method cait` do by default). Scored on {original['images']} CIFAR-10 *test* images, never used to "
            f"choose; the original's test top-1 there is {100 * original['top1']:.2f}%. Block i of the 6 merges a share of the tokens "
            "weighing (5-i)^concentration; every row reaches its target by the FLOPs model."),
        *common.markdown_table(COLUMNS, rows),
        "",
        "## Choice alone for the ATME+CDCP rows of `benchmarks/cait.py` (token share √S of the target S)",
        "",
        *common.markdown_table(CDCP_MARKDOWN, cdcp),
    ]
    for row in cdcp:  # the data keep the per-concentration KL as flat columns (calibration_kl_1, ...)
        del row["calibration_kl"]
    common.write_table(args.out, lines, {"rows": (COLUMNS, rows), "cdcp": (CDCP_COLUMNS, cdcp)}, echo=True,
                       command=command.strip("`"), test_images=original["images"], original_test_top1=original["top1"])


if __name__ == "__main__":
    main()
