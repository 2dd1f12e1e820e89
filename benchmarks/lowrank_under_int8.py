"""Low-rank under int8 on the dinov2-s14 CIFAR-10 classifier, in ONNX Runtime (issues #27 and #28).

Does low-rank still pay once the model runs int8? Each row is an ONNX file that ONNX Runtime
runs: the float32 original, its dynamic-int8 file (what ``vitslim export --int8 dynamic`` writes,
the one-flag alternative), and for each ``--ratios`` the low-rank model (``vitslim.compress(model,
"lowrank", param_ratio=r, rank_multiple=8)``, training-free) and the same model after one KD run
(``vitslim.distill``, ``--kd-epochs`` over ``--kd-images`` seeded train images), each as float32
and as dynamic int8. Every file is scored on the same seeded test images in the same batches (top-1
against the labels, agreement with the PyTorch original's predictions) and all are timed in one
interleaved ``vitslim.benchmark(..., runtime="onnxruntime")`` run against the float32 original;
``over dense int8`` is a file's throughput over the dense int8 file's in that run. The export's
guard on an int8 file (its logits' relative error to PyTorch's float ones, 0.2 in the library) is
loosened to ``--int8-tolerance``: low-rank 50% quantised measured 0.206, and its accuracy, not the
guard, is what this page is for; the error is shown beside the files exported in the run.

Targets read from it: #28, low-rank + int8 >= 1.15x faster than dense int8 at no more than 1 extra
point; #27, low-rank 60% training-free within 2.0 points, 50% within 1.0 point after <= 1 KD epoch
on <= 5,000 train images.

    .venv/bin/python benchmarks/lowrank_under_int8.py     # results/lowrank-int8/lowrank-int8.md (about 50 min)
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import common
import torch
from common import Column, Rows
from int8_plan import file_predictions

import vitslim
from vitslim.deploy.export import export_checked_onnx
from vitslim.io import image_batches
from vitslim.measure.metrics import count_params

OUT = common.RESULTS / "lowrank-int8"
DINOV2 = f"local-dir:{common.SHARED / 'models' / 'dinov2-s14'}"
COLUMNS = [Column("variant", "variant"), Column("runtime_kind", "ONNX file"), Column("top1", "top-1", "{:.2%}"),
           Column("delta", "Δ top-1 vs original (pts)", "{:+.2f}", "-"), Column("delta_int8", "Δ vs dense int8 (pts)", "{:+.2f}", "-"),
           Column("agreement", "agreement", "{:.2%}"), Column("params", "ViT params", "{:,}"),
           Column("speedup", "speed-up (ORT, vs float32 ORT)", "**{:.2f}x**", "-"), Column("over_int8", "over dense int8", "{:.2f}x", "-"),
           Column("spread", "ratio spread", "{:.0%}", "-"), Column("int8_error", "int8 rel. error (8 images)", "{:.3f}", "-"), Column("seconds", "compress + KD s", "{:.0f}")]


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--model", default=DINOV2)
    parser.add_argument("--train", default=common.CIFAR_TRAIN)
    parser.add_argument("--test", default=common.CIFAR_TEST)
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.6, 0.5])
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--kd-images", type=int, default=5000)
    parser.add_argument("--kd-epochs", type=int, default=1)
    parser.add_argument("--kd-lr", type=float, default=1e-5)
    parser.add_argument("--kd-batch", type=int, default=16)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--eval-batch", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16, help="timing batch")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    common.add_int8_tolerance(parser)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    out = Path(args.out)
    files = out / "files"
    files.mkdir(parents=True, exist_ok=True)
    rows = Rows(out / "rows.json")
    original = vitslim.load_model(args.model)
    spec = vitslim.describe(original)
    train, test = common.open_split(spec, args.train), common.open_split(spec, args.test)
    kd_train = image_batches.select(train, limit=args.kd_images, seed=args.seed)
    loader = image_batches.make_loader(image_batches.select(test, limit=args.test_images, seed=args.seed), args.eval_batch)
    with torch.inference_mode():
        reference = torch.cat([spec.output(images).argmax(-1) for images, _, _ in loader])
    check = torch.stack([test[index][0] for index in range(8)])
    recovery = vitslim.Training(epochs=args.kd_epochs, lr=args.kd_lr, batch_size=args.kd_batch, seed=args.seed)
    budget = f"{len(kd_train)} images x {args.kd_epochs} epoch(s), lr {args.kd_lr:g}, batch {args.kd_batch}"

    def add(key: str, label: str, model: torch.nn.Module, seconds: float) -> None:
        for kind, int8 in (("float32", None), ("dynamic int8", "dynamic")):
            name = f"{key}-{'int8' if int8 else 'float32'}"
            path = files / f"{name}.onnx"
            if rows.has(key=name):
                continue
            int8_error = {}
            if not path.is_file():
                written = export_checked_onnx(model, path, check, int8=int8, int8_tolerance=args.int8_tolerance)
                if written.int8 is not None:
                    int8_error = {"int8_error": written.int8.relative_error}
            row = rows.add({"key": name, "variant": label, "runtime_kind": kind, **file_predictions(path, loader, reference), **int8_error,
                            "params": count_params(vitslim.describe(model).model), "seconds": round(seconds, 1)})
            print(f"[lowrank-int8] {name}: top-1 {100 * row['top1']:.2f}%, agreement {100 * row['agreement']:.2f}%", flush=True)

    add("original", "original", original, 0.0)
    for ratio in args.ratios:
        key = f"lowrank-{ratio:g}"
        if rows.has(key=f"{key}-kd-int8"):
            continue
        started = time.perf_counter()
        compressed = vitslim.compress(original, "lowrank", train, calib_images=args.calib_images, seed=args.seed, param_ratio=ratio,
                                      rank_multiple=8)
        seconds = time.perf_counter() - started
        add(key, f"low-rank {ratio:.0%}, training-free", compressed, seconds)
        student = copy.deepcopy(compressed)
        started = time.perf_counter()
        vitslim.distill(student, original, kd_train, recovery)
        add(f"{key}-kd", f"low-rank {ratio:.0%} + KD ({budget})", student, seconds + time.perf_counter() - started)

    keys = [row["key"] for row in rows]
    results = vitslim.benchmark([(key, files / f"{key}.onnx") for key in keys], runtime="onnxruntime", batch_size=args.batch_size,
                                runs=args.runs)
    by_key = {result.model: result for result in results}
    dense_int8, base = rows.find(key="original-int8"), rows.find(key="original-float32")
    for row in rows:
        result = by_key[row["key"]]
        rows.update(row, speedup=result.ratio, spread=result.ratio_spread, noisy=result.noisy,
                    over_int8=result.images_per_s / by_key["original-int8"].images_per_s,
                    delta=100 * (row["top1"] - base["top1"]), delta_int8=100 * (row["top1"] - dense_int8["top1"]))
    rows.save()
    text = common.heading("Low-rank under int8: dinov2-s14 CIFAR-10 classifier in ONNX Runtime", __doc__.split("\n\n")[0]) + [
        f"Command: {common.rerun(parser, args)}. Top-1 of each ONNX file on {len(reference)} seeded CIFAR-10 test images (seed "
        f"{args.seed}), agreement with the PyTorch original's predictions; calibration: {args.calib_images} seeded train images; "
        f"KD: {budget} (`vitslim.distill`, from the training-free model). Timing: batch {args.batch_size}, {args.runs} interleaved "
        "rounds, ratio to the float32 ONNX original; `over dense int8`: throughput over the dense int8 file's in the same run.", ""]
    text += common.markdown_table(COLUMNS, list(rows))
    common.write_table(out / "lowrank-int8.md", text, {"rows": (COLUMNS, list(rows))}, echo=True)


if __name__ == "__main__":
    main()
