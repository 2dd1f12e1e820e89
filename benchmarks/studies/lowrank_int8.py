"""Can low-rank factors pay under ONNX Runtime's dynamic int8 (issue #28, item 2)? Two questions,
each answered on single Linear layers in ONNX Runtime, the runtime that ships:

1. **Speed.** For each Linear shape of dinov2-s14 (qkv 384→1152, attention projection 384→384,
   fc1 384→1536, fc2 1536→384) at 16 images × 257 tokens, the time of the low-rank pair
   (``down`` then ``up``) against the dense layer, both float32 and dynamic int8, at ranks from a
   quarter of the break-even rank in·out/(in+out) to all of it, on multiples of 16, plus ranks
   off that grid to see whether the int8 kernel prefers some multiples. Graphs are built
   directly as MatMul (+ Add) on a float input and quantised by ``quantize_onnx_dynamic``, the
   function ``vitslim export --int8 dynamic`` uses, so ONNX Runtime fuses them as in a model
   (``DynamicQuantizeMatMul``). Times are interleaved over ``--rounds`` rounds, median per file.

2. **Error.** On real activations: the inputs of the Linears of blocks 0, 5 and 11 of
   dinov2-s14 on ImageNet sample images (32 images 0-499 fit the whitened SVD, 32 others of
   0-499 measure), each layer factorised at half its parameters. For each way of splitting the
   singular values between the two factors (``up = U S^a``, ``down = S^(1-a) Vh L⁻¹``; vitslim
   uses a = 0.5) and each whitening ridge, the relative output error of the int8 pair in ONNX
   Runtime against the dense float layer, beside the float pair's (truncation alone) and the
   dense int8 layer's. Low-rank factors are known to create activation outliers under
   quantisation (LRA-QViT); whitening adds weight outliers: ``L⁻¹`` scales up the input
   directions the calibration images hardly use, and each ``down`` row has one int8 scale.

    .venv/bin/python benchmarks/studies/lowrank_int8.py          # about 2 minutes
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import common
import numpy
import torch
from dinov2_dense import dense_data
from dinov2_saliency import IMAGENET, MODEL

import vitslim
from vitslim.deploy.export import quantize_onnx_dynamic
from vitslim.io import image_batches
from vitslim.lowrank.whitening import DEFAULT_RIDGE, whitened_spectrum
from vitslim.measure.runtimes import onnx_session

OUT = common.RESULTS / "studies" / "lowrank_int8"
SHAPES = {"qkv": (384, 1152), "proj": (384, 384), "fc1": (384, 1536), "fc2": (1536, 384)}
RANK_FRACTIONS = (0.25, 0.4, 0.5, 0.6, 0.8, 1.0)  # of the break-even rank in·out/(in+out)
OFF_GRID = (88, 92, 96, 100, 104, 112, 120, 128)  # fc1 ranks around a quarter of its break-even rank, some off every multiple
SPLITS = (0.0, 0.5, 1.0)
RIDGES = (DEFAULT_RIDGE, 1e-4, 1e-3, 1e-2)
BLOCKS = (0, 5, 11)


def linear_graph(path: Path, weights: list[numpy.ndarray], bias: numpy.ndarray | None) -> Path:
    """An ONNX file computing ``x @ w1ᵀ @ w2ᵀ ... (+ bias)`` for a (rows, in) float input: one
    MatMul per weight (out, in), as torch's exporter writes a Linear."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, initialisers = [], []
    current = "x"
    for index, weight in enumerate(weights):
        name = f"w{index}"
        initialisers.append(numpy_helper.from_array(numpy.ascontiguousarray(weight.T, dtype=numpy.float32), name))
        nodes.append(helper.make_node("MatMul", [current, name], [f"h{index}"]))
        current = f"h{index}"
    if bias is not None:
        initialisers.append(numpy_helper.from_array(bias.astype(numpy.float32), "bias"))
        nodes.append(helper.make_node("Add", [current, "bias"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", weights[0].shape[1]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", weights[-1].shape[0]])], initialisers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def with_int8(path: Path) -> tuple[Path, Path]:
    """(float file, its dynamic int8 file as ``vitslim export --int8 dynamic`` writes it)."""
    return path, quantize_onnx_dynamic(path, path.with_name(path.stem + "-int8.onnx"))


def time_files(files: dict[str, Path], inputs: numpy.ndarray, rounds: int, runs: int) -> dict[str, tuple[float, float]]:
    """Median milliseconds per run of each file, interleaved round by round, and the relative
    spread (interquartile range over median) of its rounds."""
    sessions = {key: onnx_session(path, threads=torch.get_num_threads(), device=torch.device("cpu")) for key, path in files.items()}
    for session in sessions.values():
        session.run(None, {"x": inputs})
    samples: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in range(rounds):
        for key, session in sessions.items():
            started = time.perf_counter()
            for _ in range(runs):
                session.run(None, {"x": inputs})
            samples[key].append(1000 * (time.perf_counter() - started) / runs)
    timed = {}
    for key, values in samples.items():
        quartiles = statistics.quantiles(values, n=4)
        median = statistics.median(values)
        timed[key] = (median, (quartiles[2] - quartiles[0]) / median)
    return timed


def speed_rows(scratch: Path, rows_per_run: int, rounds: int, runs: int) -> list[dict]:
    generator = numpy.random.default_rng(0)
    found = []
    for layer, (width_in, width_out) in SHAPES.items():
        break_even = width_in * width_out / (width_in + width_out)
        ranks = sorted({max(16, int(round(fraction * break_even / 16)) * 16) for fraction in RANK_FRACTIONS})
        if layer == "fc1":
            ranks = sorted(set(ranks) | set(OFF_GRID))
        dense = generator.standard_normal((width_out, width_in)).astype(numpy.float32) / width_in ** 0.5
        bias = generator.standard_normal(width_out).astype(numpy.float32)
        files = {}
        files["dense"], files["dense-int8"] = with_int8(linear_graph(scratch / f"{layer}-dense.onnx", [dense], bias))
        for rank in ranks:
            down = generator.standard_normal((rank, width_in)).astype(numpy.float32) / width_in ** 0.5
            up = generator.standard_normal((width_out, rank)).astype(numpy.float32) / rank ** 0.5
            files[f"r{rank}"], files[f"r{rank}-int8"] = with_int8(linear_graph(scratch / f"{layer}-r{rank}.onnx", [down, up], bias))
        inputs = generator.standard_normal((rows_per_run, width_in)).astype(numpy.float32)
        timed = time_files(files, inputs, rounds, runs)
        for rank in ranks:
            found.append({"layer": layer, "shape": f"{width_in}→{width_out}", "rank": rank, "of_break_even": rank / break_even,
                          "dense_ms": timed["dense"][0], "dense_int8_ms": timed["dense-int8"][0],
                          "lowrank_ms": timed[f"r{rank}"][0], "lowrank_int8_ms": timed[f"r{rank}-int8"][0],
                          "float_gain": timed["dense"][0] / timed[f"r{rank}"][0],
                          "int8_gain": timed["dense-int8"][0] / timed[f"r{rank}-int8"][0],
                          "spread": max(spread for _, spread in timed.values())})
            print(f"[lowrank-int8] {layer} rank {rank}: float {found[-1]['float_gain']:.2f}x, int8 {found[-1]['int8_gain']:.2f}x over dense int8", flush=True)
    return found


def layer_inputs(images: int, seed: int) -> tuple[dict[str, torch.nn.Linear], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """dinov2-s14's Linears of ``BLOCKS`` and their inputs on ``images`` images of 0-499 (fit)
    and ``images`` others (measure), as (tokens, in) float32 rows."""
    model = vitslim.load_model(MODEL).eval()
    spec = vitslim.describe(model)

    class Sample:
        imagenet, dense_train = str(IMAGENET), 500

    train, _ = dense_data(spec, Sample)
    chosen = image_batches.select(train, limit=2 * images, seed=seed)
    linears = {f"blocks.{block}.{path}": model.get_submodule(f"blocks.{block}.{path}")
               for block in BLOCKS for path in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    handles = [layer.register_forward_pre_hook(lambda module, args, name=name: captured[name].append(args[0].reshape(-1, args[0].shape[-1]).clone()))
               for name, layer in linears.items()]
    with torch.no_grad():
        for batch, _, _ in image_batches.make_loader(chosen, 16):
            model(batch)
    for handle in handles:
        handle.remove()
    tokens = images * (model.patch_embed.num_patches + model.num_prefix_tokens)
    fit = {name: torch.cat(rows)[:tokens] for name, rows in captured.items()}
    measure = {name: torch.cat(rows)[tokens:] for name, rows in captured.items()}
    return linears, fit, measure


def run_graph(path: Path, inputs: torch.Tensor, batch_rows: int) -> torch.Tensor:
    """The file's output on ``inputs``, run ``batch_rows`` rows at a time (one batch of 16 images,
    so that dynamic int8's per-run activation scale covers what it covers in a model)."""
    session = onnx_session(path, threads=torch.get_num_threads(), device=torch.device("cpu"))
    return torch.cat([torch.from_numpy(session.run(None, {"x": chunk.numpy()})[0]) for chunk in inputs.split(batch_rows)])


def relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    return float(error.double().norm() / reference.double().norm())


def error_rows(scratch: Path, images: int, seed: int, batch_rows: int) -> list[dict]:
    linears, fit, measure = layer_inputs(images, seed)
    found = []
    for name, layer in linears.items():
        weight, bias = layer.weight.detach().double(), layer.bias.detach().numpy()
        reference = measure[name].double() @ weight.T + bias
        width_out, width_in = weight.shape
        rank = int(width_in * width_out / (width_in + width_out) / 2) // 8 * 8
        _, dense_int8 = with_int8(linear_graph(scratch / "dense.onnx", [weight.numpy()], bias))
        row = {"layer": name, "rank": rank, "dense_int8": relative(run_graph(dense_int8, measure[name], batch_rows) - reference, reference)}
        gram = fit[name].double().T @ fit[name].double()
        for ridge in RIDGES:
            spectrum = whitened_spectrum(weight, gram, ridge)
            for split in SPLITS if ridge == DEFAULT_RIDGE else (0.5,):
                up = spectrum.U[:, :rank] * spectrum.S[:rank] ** split
                down = (spectrum.S[:rank, None] ** (1 - split) * spectrum.Vh[:rank]) @ spectrum.L_inv
                float_file, int8_file = with_int8(linear_graph(scratch / "pair.onnx", [down.numpy(), up.numpy()], bias))
                key = f"ridge{ridge:g}-split{split:g}"
                if split == 0.5:
                    row[f"{key}-float"] = relative(run_graph(float_file, measure[name], batch_rows) - reference, reference)
                row[f"{key}-int8"] = relative(run_graph(int8_file, measure[name], batch_rows) - reference, reference)
                row[f"{key}-down_peak"] = float(down.abs().max() / down.abs().median())
        found.append(row)
        print(f"[lowrank-int8] {name} rank {rank}: dense int8 {row['dense_int8']:.4f}, "
              + ", ".join(f"{key} {value:.4f}" for key, value in row.items() if key.endswith("int8") and key != "dense_int8"), flush=True)
    return found


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--images", type=int, default=32, help="images that fit the factors, and as many that measure their error")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    started = time.perf_counter()
    info = common.machine()
    tokens = 257
    with tempfile.TemporaryDirectory() as scratch:
        speed = speed_rows(Path(scratch), 16 * tokens, args.rounds, args.runs)
        errors = error_rows(Path(scratch), args.images, args.seed, 16 * tokens)
    out = Path(args.out)
    speed_columns = [common.Column("layer", "layer"), common.Column("shape", "in→out"), common.Column("rank", "rank"),
                     common.Column("of_break_even", "of break-even rank", "{:.2f}"),
                     common.Column("dense_ms", "dense float ms", "{:.2f}"), common.Column("lowrank_ms", "low-rank float ms", "{:.2f}"),
                     common.Column("dense_int8_ms", "dense int8 ms", "{:.2f}"), common.Column("lowrank_int8_ms", "low-rank int8 ms", "{:.2f}"),
                     common.Column("float_gain", "low-rank / dense, float", "{:.2f}x"),
                     common.Column("int8_gain", "low-rank int8 / dense int8", "{:.2f}x"),
                     common.Column("spread", "worst spread", lambda v: f"{100 * v:.0f}%")]
    error_columns = [common.Column("layer", "layer"), common.Column("rank", "rank"), common.Column("dense_int8", "dense int8", "{:.4f}")]
    error_columns.append(common.Column(f"ridge{DEFAULT_RIDGE:g}-split0.5-float", "pair float (truncation)", "{:.4f}"))
    for split in SPLITS:
        error_columns.append(common.Column(f"ridge{DEFAULT_RIDGE:g}-split{split:g}-int8", f"pair int8, a={split:g}", "{:.4f}"))
    for ridge in RIDGES[1:]:
        error_columns.append(common.Column(f"ridge{ridge:g}-split0.5-float", f"ridge {ridge:g}: float", "{:.4f}"))
        error_columns.append(common.Column(f"ridge{ridge:g}-split0.5-int8", f"ridge {ridge:g}: int8", "{:.4f}"))
    lines = common.heading("Low-rank factors under ONNX Runtime's dynamic int8", __doc__.split("\n\n")[0].replace("\n", " "), info=info)
    lines += ["", f"Command: {common.rerun(parser, args)}; {time.perf_counter() - started:.0f} s.", "",
              f"## Speed: one layer, {16 * tokens} rows (16 images × {tokens} tokens), ONNX Runtime, "
              f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds of {args.runs} runs", "",
              *common.markdown_table(speed_columns, speed), "",
              f"## Error: relative output error against the dense float layer, on {args.images} held-out images' inputs "
              f"(factors fitted on {args.images} others), each layer at half its parameters; up = U S^a, down = S^(1-a) Vh L⁻¹ "
              f"(vitslim: a = 0.5, ridge {DEFAULT_RIDGE:g})", "", *common.markdown_table(error_columns, errors)]
    common.write_table(out / "lowrank_int8.md", lines, {"speed": (speed_columns, speed), "error": (error_columns, errors)})
    print((out / "lowrank_int8.md").read_text())


if __name__ == "__main__":
    main()
