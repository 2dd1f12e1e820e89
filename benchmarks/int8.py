"""Dynamic int8 against float32, each in the runtime it runs in (issue #19's second target).

Three kinds of one model are compared: float32, weight-only int8 (``compress --int8``: int8
weights dequantised on every call, the smallest file) and dynamic int8 (``--int8 dynamic``:
activations quantised at run time, int8 matmuls). In eager PyTorch the three are modules; in ONNX
Runtime the float32 file and the file ``vitslim export --int8 dynamic`` writes (ONNX Runtime's
own dynamic quantiser). Speed-ups are to the float32 model *of the same runtime*, every model of
a runtime timed in one interleaved ``vitslim.benchmark`` run.

Groups:

1. ``deit_small_patch16_224`` geometry (random init, speed only) and its low-rank 40% model
   (calibrated on random images: weights do not decide speed);
2. ``vit-d6-cifar10`` and the ``dinov2-s14`` CIFAR-10 classifier: speed, plus top-1 on seeded
   CIFAR-10 test images and agreement with the float32 model's predictions, every kind scored on
   the same images in the same batches (dynamic int8 scales activations per call, so a batch's
   other images can move an image's result by a rounding step).

Targets: ONNX Runtime dynamic int8 >= 1.5x its float32 file for deit_small and low-rank 40%; top-1
within 0.5 points of float32 on vit-d6-cifar10 and dinov2-s14.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import common
import torch
from common import Column
from torch.utils.data import TensorDataset

import vitslim
from vitslim._infra.progress import track
from vitslim.deploy.export import export_onnx
from vitslim.deploy.quantize import quantize_int8
from vitslim.io import image_batches
from vitslim.measure.runtimes import onnx_session

OUT = common.RESULTS / "int8"
DINOV2 = f"local-dir:{common.SHARED / 'models' / 'dinov2-s14'}"
KINDS = ("float32", "weight-only int8", "dynamic int8")


def kinds_of(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [("float32", model), ("weight-only int8", quantize_int8(copy.deepcopy(model), "weight")),
            ("dynamic int8", quantize_int8(copy.deepcopy(model), "dynamic"))]


def onnx_files(name: str, model: torch.nn.Module, folder: Path) -> list[tuple[str, str]]:
    """The float32 ONNX file and its dynamic-int8 one (exported once, kept in ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for kind, int8 in (("float32", None), ("dynamic int8", "dynamic")):
        path = folder / f"{name}-{'int8' if int8 else 'float32'}.onnx"
        if not path.is_file():
            export_onnx(model, path, int8=int8)
        files.append((kind, str(path)))
    return files


def timed(name: str, model: torch.nn.Module, args) -> list[dict]:
    """Eager rows (three kinds) and ONNX Runtime rows (two), speed-ups within each runtime."""
    rows = []
    eager = vitslim.benchmark(kinds_of(model), batch_size=args.batch_size, runs=args.runs, progress=False)
    ort = vitslim.benchmark(onnx_files(name, model, Path(args.out) / "models"), runtime="onnxruntime",
                            batch_size=args.batch_size, runs=args.runs, progress=False)
    for result in eager + ort:
        rows.append({"model": name, "runtime": result.runtime, "kind": result.model,
                     "images_per_s": result.images_per_s, "speedup": result.ratio})
        print(f"[{name}] {result.runtime} {result.model}: {result.images_per_s:.1f} img/s, {result.ratio:.2f}x", flush=True)
    return rows


def scored(name: str, model: torch.nn.Module, test_path: str, args) -> dict[tuple[str, str], dict]:
    """Top-1 and agreement with float32 of every kind in both runtimes, on the same seeded images."""
    spec = vitslim.describe(model)
    test = image_batches.select(common.open_split(spec, test_path), limit=args.test_images, seed=args.seed)
    described = [(kind, vitslim.describe(module)) for kind, module in kinds_of(model)]
    sessions = [(kind, onnx_session(path, threads=torch.get_num_threads(), device=torch.device("cpu")))
                for kind, path in onnx_files(name, model, Path(args.out) / "models")]
    predictions: dict[tuple[str, str], list[torch.Tensor]] = {}
    labels = []
    for images, batch_labels, _ in track(image_batches.make_loader(test, args.eval_batch), f"scoring {name}", unit="batch"):
        labels.append(batch_labels)
        with torch.inference_mode():
            for kind, module_spec in described:
                predictions.setdefault(("eager", kind), []).append(module_spec.output(images))
        for kind, session in sessions:
            logits = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
            predictions.setdefault(("onnxruntime", kind), []).append(torch.from_numpy(logits))
    truth = torch.cat(labels)
    reference = torch.cat(predictions[("eager", "float32")]).argmax(-1)
    scores = {}
    for key, outputs in predictions.items():
        predicted = torch.cat(outputs).argmax(-1)
        scores[key] = {"top1": (predicted == truth).float().mean().item(),
                       "agreement": (predicted == reference).float().mean().item(), "images": len(truth)}
    return scores


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--reference", default=common.REFERENCE_MODEL, help="vit-d6-cifar10")
    parser.add_argument("--dinov2", default=DINOV2)
    parser.add_argument("--test", default=common.CIFAR_TEST)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--eval-batch", type=int, default=50)
    parser.add_argument("--calib-images", type=int, default=64, help="random images the low-rank 40%% model calibrates on")
    parser.add_argument("--batch-size", type=int, default=16, help="timing batch")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=str(OUT))
    args = parser.parse_args()
    args.out = args.results
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    deit_small = vitslim.load_model("deit_small_patch16_224")
    size = vitslim.describe(deit_small).preprocessing.input_size
    random_images = TensorDataset(torch.randn(args.calib_images, *size, generator=torch.Generator().manual_seed(0)),
                                  torch.zeros(args.calib_images, dtype=torch.long))
    lowrank = vitslim.compress(deit_small, "lowrank", random_images, calib_images=args.calib_images, param_ratio=0.4,
                               rank_multiple=8, progress=False)
    rows = timed("deit_small", deit_small, args) + timed("deit_small low-rank 40%", lowrank, args)
    for name, source in (("vit-d6-cifar10", args.reference), ("dinov2-s14", args.dinov2)):
        model = vitslim.load_model(source)
        speed = timed(name, model, args)
        scores = scored(name, model, args.test, args)
        for row in speed:
            row.update(scores[(row["runtime"], row["kind"])])
        rows += speed
    for row in rows:
        if "top1" in row:
            base = next(other for other in rows if other["model"] == row["model"] and other["runtime"] == "eager"
                        and other["kind"] == "float32")
            row["delta"] = 100 * (row["top1"] - base["top1"])
    columns = [Column("model", "model"), Column("runtime", "runtime"), Column("kind", "kind"),
               Column("images_per_s", "images/s", "{:.1f}"), Column("speedup", "speed-up in its runtime", "**{:.2f}x**"),
               Column("top1", "top-1", "{:.2%}", "-"), Column("delta", "Δ vs float32 eager", "{:+.2f}", "-"),
               Column("agreement", "agreement with float32", "{:.2%}", "-")]
    text = (f"Command: {common.rerun(parser, args, leave_out=('out',))}.\n\n"
            f"Speed: CPU, batch {args.batch_size}, median of {args.runs} interleaved rounds, {torch.get_num_threads()} "
            f"threads; the speed-up is to the float32 model of the same runtime (eager PyTorch: the modules; "
            f"onnxruntime: the float32 ONNX file and the one `export --int8 dynamic` writes). Accuracy: "
            f"{args.test_images} seeded CIFAR-10 test images (seed {args.seed}), batches of {args.eval_batch}, every kind "
            f"on the same batches; agreement is with the float32 eager model's predictions. deit_small has random "
            f"weights (speed only); its low-rank 40% model was calibrated on {args.calib_images} random images. "
            f"Ran in {time.perf_counter() - started:.0f} s.")
    lines = common.heading("Dynamic int8 against float32, in the runtime it runs in", text)
    lines += common.markdown_table(columns, rows) + [""]
    common.write_table(Path(args.out) / "int8.md", lines, {"rows": (columns, rows)}, echo=True)


if __name__ == "__main__":
    main()
