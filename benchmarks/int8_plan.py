"""int8 in the plan, measured in ONNX Runtime on dinov2-s14 (issue #28).

Every row is an ONNX file that ONNX Runtime runs, timed against the float32 ONNX original in
one interleaved ``vitslim.benchmark(..., runtime="onnxruntime")`` run (batch ``--batch-size``,
median of ``--runs`` rounds), and scored by running *that file* on the reported images, so ONNX
Runtime's own int8 arithmetic is what is judged.

- ``--task saliency`` (default): the saliency model; its maps against the original PyTorch
  model's (Pearson r, IoU@0.8, MAE). Calibration and every choice use ImageNet sample images
  0-499 (``--calib-images`` of them, seeded); images 500-999 are reported (``--dense-report``).
- ``--task classification``: the CIFAR-10 classifier; top-1 and agreement with the original
  PyTorch model's predictions on ``--test-images`` seeded test images. Calibration and every
  choice use seeded train images.

Rows:

- **dynamic int8, every Linear**: what ``vitslim export --int8 dynamic`` writes;
- **dynamic int8, float32 fallback**: ``deploy.int8_fallback.plan_int8`` on the calibration
  images, the Linears it keeps in float32 exported float;
- **lowrank+cait at each ``--plans`` target** (``runtime="onnxruntime"``, ``int8_axis="dynamic"``,
  training-free, low-rank and token axes probed at ``LADDERS``: each probe is exported and timed
  twice, float and int8, so the default ladders would take hours here): the plan's choice, the
  speed-up it measured when it stopped, and the one this run measures. With ``--kd-epochs N``
  each plan is built with the pipeline's recovery step (``recovery=vitslim.Training(...)``: the
  float model distilled from the original over ``--kd-images`` seeded train images, N epochs)
  before its planned int8 is applied; its row is ``plan-<target>-kd<N>``, and the plan's
  calibration images are drawn from those training images.

    .venv/bin/python benchmarks/int8_plan.py            # results/int8-plan/int8-plan.md
    .venv/bin/python benchmarks/int8_plan.py --task classification   # results/int8-plan-classification/
"""

from __future__ import annotations

import time
from pathlib import Path

import common
import torch
from common import Column, Rows
from dinov2_dense import dense_data
from dinov2_saliency import IMAGENET, MODEL, THRESHOLD, load_saliency

import vitslim
from vitslim._infra.progress import track
from vitslim.deploy.export import export_checked_onnx
from vitslim.deploy.int8_fallback import plan_int8
from vitslim.deploy.quantize import quantize_int8
from vitslim.io import image_batches
from vitslim.io.recipe import find_step
from vitslim.measure.fidelity import MapFidelity
from vitslim.measure.runtimes import onnx_session

RESULTS = {"saliency": common.RESULTS / "int8-plan", "classification": common.RESULTS / "int8-plan-classification"}
LADDERS = {"lowrank": (0.8, 0.6, 0.5, 0.4), "tokens": (1.3, 1.6, 2.0, 2.3)}
SCORE_COLUMNS = {"saliency": (Column("pearson", "Pearson r", "{:.4f}"), Column("iou", f"IoU@{THRESHOLD}", "{:.3f}"),
                              Column("mae", "MAE", "{:.4f}")),
                 "classification": (Column("top1", "top-1", "{:.2%}"), Column("delta", "Δ top-1 (pts)", "{:+.2f}", "-"),
                                    Column("agreement", "agreement", "{:.2%}"))}
TIMING_COLUMNS = (Column("planned", "speed-up the plan measured", "{:.2f}x", "-"), Column("speedup", "measured speed-up (ORT, vs float32 ORT)", "{:.2f}x", "-"),
           Column("spread", "ratio spread", lambda v: f"{100 * v:.0f}%", "-"), Column("seconds", "compress s", "{:.0f}", "-"))

PROBE_COLUMNS = (Column("plan", "plan"), Column("axis", "axis"), Column("level", "level", "{:g}"), Column("cost", "cost (KL)", "{:.4f}"),
                 Column("flops_ratio", "FLOPs ratio", "{:.3f}"), Column("speedup", "speed-up", "{:.2f}x", "-"),
                 Column("int8_speedup", "with int8", "{:.2f}x", "-"))


def file_predictions(path: Path, loader, reference: torch.Tensor) -> dict:
    """Top-1 and agreement of the classes ONNX Runtime computes from ``path`` on ``loader``'s
    labelled images, agreement with ``reference`` (the original's classes on the same images)."""
    session = onnx_session(path, threads=torch.get_num_threads(), device=torch.device("cpu"))
    predicted = torch.cat([torch.from_numpy(session.run(None, {"images": images.numpy()})[0]).argmax(-1)
                           for images, _, _ in track(loader, f"scoring {path.stem}", unit="batch")])
    labels = torch.cat([labels for _, labels, _ in loader])
    return {"top1": (predicted == labels).float().mean().item(), "agreement": (predicted == reference).float().mean().item(),
            "images": len(labels)}


def file_maps(path: Path, loader, teacher) -> dict:
    """The maps ONNX Runtime computes from ``path`` on ``loader``'s images, scored against ``teacher``'s."""
    session = onnx_session(path, threads=torch.get_num_threads(), device=torch.device("cpu"))
    fidelity = MapFidelity(THRESHOLD)
    with torch.no_grad():
        for batch, _, _ in loader:
            (maps,) = session.run(None, {"images": batch.numpy()})
            fidelity.update(torch.from_numpy(maps), teacher(batch))
    return fidelity.result()


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--task", choices=tuple(RESULTS), default="saliency")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--imagenet", default=str(IMAGENET))
    parser.add_argument("--calib-images", type=int, default=128)
    parser.add_argument("--dense-train", type=int, default=500)
    parser.add_argument("--dense-report", type=int, default=500)
    parser.add_argument("--train", default=common.CIFAR_TRAIN, help="classification: the train images")
    parser.add_argument("--test", default=common.CIFAR_TEST, help="classification: the test images")
    parser.add_argument("--test-images", type=int, default=2000, help="classification: seeded test images reported")
    parser.add_argument("--plans", type=float, nargs="*", default=[2.5])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--kd-epochs", type=int, default=0, help="distil each plan for N epochs before its int8 (0: training-free)")
    parser.add_argument("--kd-images", type=int, default=5000, help="seeded train images the KD runs over (saliency: of 0-499)")
    parser.add_argument("--kd-lr", type=float, default=1e-5)
    parser.add_argument("--kd-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    common.add_int8_tolerance(parser)
    parser.add_argument("--out", help="default: results/int8-plan (saliency), results/int8-plan-classification")
    args = parser.parse_args()
    out = Path(args.out or RESULTS[args.task])
    files = out / "files"
    files.mkdir(parents=True, exist_ok=True)
    rows = Rows(out / "rows.json")
    saliency = args.task == "saliency"
    teacher = load_saliency(args.model) if saliency else vitslim.load_model(args.model)
    spec = vitslim.describe(teacher)
    if saliency:
        train, report = dense_data(spec, args)
        loader = image_batches.make_loader(image_batches.select(report, limit=args.dense_report, seed=args.seed), 16)
        score_file = lambda path: file_maps(path, loader, teacher)  # noqa: E731
    else:
        train = common.open_split(spec, args.train)
        loader = image_batches.make_loader(image_batches.select(common.open_split(spec, args.test), limit=args.test_images, seed=args.seed), 50)
        with torch.inference_mode():
            reference = torch.cat([spec.output(images).argmax(-1) for images, _, _ in loader])
        score_file = lambda path: file_predictions(path, loader, reference)  # noqa: E731
    score_names = [column.key for column in SCORE_COLUMNS[args.task] if column.key != "delta"]
    calibration = image_batches.make_loader(image_batches.select(train, limit=args.calib_images, seed=args.seed), 16)
    check = torch.randn(4, *spec.preprocessing.input_size, generator=torch.Generator().manual_seed(1))

    def add(key: str, label: str, model, seconds: float, **extra) -> None:
        path = files / f"{key}.onnx"
        int8 = "dynamic" if key != "original" else None
        if not path.is_file():
            export_checked_onnx(model, path, check, int8=int8, int8_tolerance=args.int8_tolerance)
        if rows.has(key=key):
            return
        score = score_file(path)
        rows.add({"key": key, "variant": label, **{name: score[name] for name in score_names}, "images": score["images"],
                  "seconds": round(seconds, 1), **extra})
        print(f"[int8-plan] {key}: " + ", ".join(f"{name} {score[name]:.4f}" for name in score_names), flush=True)

    add("original", "float32 ONNX original", teacher, 0.0)
    started = time.perf_counter()
    add("int8-all", "dynamic int8, every Linear", quantize_int8(teacher, "dynamic"), time.perf_counter() - started)
    if not rows.has(key="int8-fallback"):  # the plan takes minutes; its file and row are kept
        started = time.perf_counter()
        planned = plan_int8(teacher, "dynamic", calibration)
        add("int8-fallback", "dynamic int8, float32 fallback", quantize_int8(teacher, "dynamic", keep_float=planned.keep_float),
            time.perf_counter() - started, choice=", ".join(planned.keep_float) or "none kept float")
    recovery, plan_images, trained = None, train, ""
    if args.kd_epochs > 0:
        recovery = vitslim.Training(epochs=args.kd_epochs, lr=args.kd_lr, batch_size=args.kd_batch, seed=args.seed)
        plan_images = image_batches.select(train, limit=args.kd_images, seed=args.seed)
        trained = f" + KD ({len(plan_images)} images x {args.kd_epochs} epoch(s), lr {args.kd_lr:g}, batch {args.kd_batch})"
    for target in args.plans:
        key = f"plan-{target:g}" + (f"-kd{args.kd_epochs}" if recovery else "")
        label = f"lowrank+cait {target:g}x (ORT, int8 axis){trained}"
        if rows.has(key=key):
            continue
        started = time.perf_counter()
        config = vitslim.LowRankCait(speedup=target, runtime="onnxruntime", int8_axis="dynamic", axes=("lowrank", "tokens"), ladders=LADDERS)
        try:
            compressed = vitslim.compress(teacher, config, plan_images, calib_images=args.calib_images, seed=args.seed, recovery=recovery)
        except vitslim.VitslimError as error:  # a target no probed combination reaches: the row says so
            rows.add({"key": key, "variant": label, "choice": f"refused: {error}", "seconds": round(time.perf_counter() - started, 1)})
            continue
        seconds = time.perf_counter() - started
        vitslim.save(compressed, out / "models" / key)
        step = find_step(compressed, "lowrank+cait")
        add(key, label, compressed, seconds, planned=step["measured_speedup"],
            keep_float=(step.get("int8") or {}).get("keep_float"), probes=step["probes"], choice=", ".join(f"{axis} {level:g}" for axis, level in step["levels"].items() if level != 1) or "nothing")
    keys = [row["key"] for row in rows if (files / f"{row['key']}.onnx").is_file()]
    results = vitslim.benchmark([(key, files / f"{key}.onnx") for key in keys], runtime="onnxruntime", batch_size=args.batch_size, runs=args.runs)
    for result in results:
        row = rows.find(key=result.model)
        rows.update(row, speedup=result.ratio, spread=result.ratio_spread, noisy=result.noisy)
    if not saliency:
        original_top1 = rows.find(key="original")["top1"]
        for row in rows:
            if "top1" in row:  # a refused plan's row has no file to score
                rows.update(row, delta=100 * (row["top1"] - original_top1))
    rows.save()
    columns = (Column("variant", "variant"), Column("choice", "choice", missing="-"), *SCORE_COLUMNS[args.task], *TIMING_COLUMNS)
    images = rows.find(key="original")["images"]
    scored = (f"Maps of each ONNX file on {images} images of 500-999 against the PyTorch original's; calibration: {args.calib_images} "
              f"seeded images of 0-{args.dense_train - 1}." if saliency else
              f"Top-1 of each ONNX file on {images} seeded CIFAR-10 test images, agreement with the PyTorch original's predictions; "
              f"calibration: {args.calib_images} seeded train images.")
    name = Path(args.model.split(":", 1)[-1]).name
    title = f"{name} saliency model" if saliency else f"{name} classifier"
    text = common.heading(f"int8 in the plan: {title} in ONNX Runtime", __doc__.split("\n\n")[0]) + [
        f"Command: {common.rerun(parser, args)}. {scored} Timing: batch {args.batch_size}, {args.runs} interleaved rounds, ratio to "
        "the float32 ONNX original.", ""]
    text += common.markdown_table(columns, list(rows))
    probes = [{"plan": row["key"], **probe} for row in rows for probe in row.get("probes", [])]
    if probes:
        text += ["", "## The plans' probes", "", "Each axis alone at each level of its ladder (int8 alone: axis int8), timed in ONNX Runtime "
                 "against the float32 original as the plan timed it; `with int8`: the same probe with dynamic int8 added. Cost: mean KL "
                 "of the objective on the probe images.", "", *common.markdown_table(PROBE_COLUMNS, probes)]
    common.write_table(out / "int8-plan.md", text, {"rows": (columns, list(rows)), "probes": (PROBE_COLUMNS, probes)}, echo=True)


if __name__ == "__main__":
    main()
