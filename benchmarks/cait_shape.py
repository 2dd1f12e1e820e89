"""Does choosing the merge schedule's concentration on calibration images pay off on held-out ones?

For each method and FLOPs target, ``compress_cait``'s choice is replayed: every candidate
concentration is planned for the target and scored (mean KL to the unmerged model) on the same
seeded 256 *train* images the CLI would use, and the lowest is chosen. Every candidate is then
scored on the CIFAR-10 *test* split (never used to choose): agreement and KL with the unmerged
model, and top-1. A second table gives the choice alone for the token targets of the ATME+CDCP
rows of ``benchmarks/cait.py`` (the square root of their speed-up targets).

    .venv/bin/python benchmarks/cait_shape.py
"""

from __future__ import annotations

import argparse
import math
import platform
from pathlib import Path

import torch

import vitslim
from vitslim import data as imagedata
from vitslim.adapters import describe
from vitslim.atomic import atomic_file
from vitslim.cait.patch import apply_token_merging, remove_token_merging
from vitslim.cait.schedule import predicted_speedup, schedule_for_speedup
from vitslim.cait.shape import CHOICE_IMAGES, CONCENTRATIONS, choice_batches, choose_concentration
from vitslim.metrics import ClassificationScore

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CDCP_TARGETS = (2.2, 2.4, 2.6, 3.0, 3.4)


def _score(model, batches, reference) -> dict:
    spec = describe(model)
    score = ClassificationScore(len(reference[0][0][0]))
    with torch.no_grad():
        for (images, labels), (teacher_logits, _) in zip(batches, reference):
            score.update(spec.logits(images), labels, teacher_logits)
    return score.result()


def _steps(schedule) -> str:
    return " ".join(f"({b},{r},{level})" if schedule.method == "atme" else f"({b},{r})" for b, r, level in schedule.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=f"local-dir:{SHARED / 'models' / 'vit-d6-cifar10'}")
    parser.add_argument("--train", default=str(SHARED / "data" / "cifar10-jpeg" / "train.zip"))
    parser.add_argument("--test", default=str(SHARED / "data" / "cifar10-jpeg" / "test.zip"))
    parser.add_argument("--targets", type=float, nargs="+", default=[1.3, 1.45, 1.6, 2.0, 2.4])
    parser.add_argument("--test-images", type=int, default=None, help="test images scored (default: the whole split)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cait" / "shape.md"))
    args = parser.parse_args()

    model = vitslim.load_model(args.model)
    spec = describe(model)
    transform = imagedata.build_transform(spec.preprocessing)
    train = imagedata.open_images(args.train, transform, class_names=spec.label_names)
    test = imagedata.open_images(args.test, transform, class_names=spec.label_names)
    if args.test_images:
        test = imagedata.select(test, limit=args.test_images, seed=0)
    batches = [(images, labels) for images, labels, _ in imagedata.make_loader(test, 250)]
    with torch.no_grad():
        reference = [(spec.logits(images), labels) for images, labels in batches]
    original = _score(model, batches, reference)

    def choose(method: str, target: float) -> tuple[float, dict[float, float]]:
        # compress_cait's own choice: the same seeded subset of the training images (seed 0)
        return choose_concentration(model, method, target, choice_batches(train, CHOICE_IMAGES, 0), progress=False)

    rows = []
    for target in args.targets:
        for method in ("atme", "tome"):
            chosen, calibration_kl = choose(method, target)
            for concentration in CONCENTRATIONS:
                schedule = schedule_for_speedup(spec, method, target, concentration=concentration)
                apply_token_merging(model, schedule, record=False)
                result = _score(model, batches, reference)
                remove_token_merging(model)
                rows.append((target, method, concentration, concentration == chosen, calibration_kl[concentration], schedule, result))
                print(f"{target} {method} c={concentration:g}{' chosen' if concentration == chosen else ''}: calibration KL "
                      f"{calibration_kl[concentration]:.4f}, test top-1 {100 * result['top1']:.2f}%, KL {result['kl']:.4f}", flush=True)
    cdcp = []
    for speedup in CDCP_TARGETS:
        token_target = math.sqrt(speedup)
        chosen, calibration_kl = choose("atme", token_target)
        cdcp.append((speedup, token_target, chosen, calibration_kl))

    lines = [
        "# Merge schedule concentration, chosen on train images, scored on test images",
        "",
        f"Command: `.venv/bin/python benchmarks/cait_shape.py`. vit-d6-cifar10, CPU ({platform.processor() or platform.machine()}), float32. "
        f"The choice: mean KL to the unmerged model on {CHOICE_IMAGES} seeded CIFAR-10 *train* images (what `compress_cait` and "
        f"`vitslim compress --method cait` do by default). Scored on {original['images']} CIFAR-10 *test* images, never used to choose; "
        f"the original's test top-1 there is {100 * original['top1']:.2f}%. Block i of the 6 merges a share of the tokens weighing "
        "(5-i)^concentration; every row reaches its target by the FLOPs model.",
        "",
        "| target | method | concentration | chosen | calibration KL | schedule (block, r, level) | FLOPs speed-up | test agreement | test KL | test top-1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for target, method, concentration, chosen, calibration_kl, schedule, result in rows:
        lines.append(f"| {target:g}x | {'ATME' if method == 'atme' else 'ToMe'} | {concentration:g} | {'**yes**' if chosen else ''} | "
                     f"{calibration_kl:.4f} | {_steps(schedule)} | {predicted_speedup(spec, schedule):.2f}x | "
                     f"{100 * result['agreement']:.2f}% | {result['kl']:.4f} | {100 * result['top1']:.2f}% |")
    lines += ["", "## Choice alone for the ATME+CDCP rows of `benchmarks/cait.py` (token share √S of the target S)", "",
              "| target S | token target | chosen | calibration KL per concentration |", "| --- | --- | --- | --- |"]
    for speedup, token_target, chosen, calibration_kl in cdcp:
        lines.append(f"| {speedup:g}x | {token_target:.3f}x | {chosen:g} | {', '.join(f'{c:g}: {kl:.4f}' for c, kl in calibration_kl.items())} |")
    atomic_file(Path(args.out), lambda partial: partial.write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
