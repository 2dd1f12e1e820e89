"""Low-rank compression at ViT-B scale: compression time, peak memory and the speed it buys.

deit_base_patch16_224 geometry (random init: nothing is downloaded), calibrated on the 256
ImageNet sample images, compressed with vitslim's defaults (whitened SVD, Fisher-weighted mixed
ranks, layer-wise compensation):

1. to deit_small_patch16_224's parameter count (``--like``): wall time and the process's peak
   resident memory (VmHWM, which includes the original model, the images and the copy);
2. to 40% of its parameters, then throughput of the original and the compressed model in one
   interleaved ``vitslim.benchmark`` run (CPU, batch 32 unless told otherwise).

    .venv/bin/python benchmarks/lowrank_scale.py --out benchmarks/results/lowrank-deit-base
"""

from __future__ import annotations

import time
from pathlib import Path

import common
import torch

import vitslim
from vitslim.lowrank.compress import compress_lowrank
from vitslim.measure.bench import _peak_rss_mb
from vitslim.measure.metrics import count_params


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--model", default="deit_base_patch16_224")
    parser.add_argument("--like", default="deit_small_patch16_224")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--data", default=str(common.SHARED / "data" / "imagenet-sample-256"))
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--rank-multiple", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=str(common.RESULTS / "lowrank-deit-base"))
    args = parser.parse_args()

    torch.manual_seed(0)
    model = vitslim.load_model(args.model)
    spec = vitslim.describe(model)
    images = common.open_split(spec, args.data, labelled=False)
    calibration = common.image_batches(images, args.calib_images, 32)
    like_params = count_params(vitslim.load_model(args.like))
    result = {"model": args.model, "params": count_params(model), "calib_images": sum(b.shape[0] for b in calibration),
              "rank_multiple": args.rank_multiple, "threads": torch.get_num_threads(), "cpu": common.cpu_name(), "machine": common.machine()}

    started = time.perf_counter()
    like = compress_lowrank(model, calibration, vitslim.LowRank(params=like_params, rank_multiple=args.rank_multiple))
    result.update(like_target=like_params, like_params=count_params(like), like_seconds=time.perf_counter() - started,
                  like_peak_rss_mb=_peak_rss_mb())
    print(f"to {args.like}'s {like_params:,} parameters: {result['like_seconds']:.0f} s, peak RSS {result['like_peak_rss_mb']:.0f} MB", flush=True)
    del like

    started = time.perf_counter()
    smaller = compress_lowrank(model, calibration, vitslim.LowRank(param_ratio=args.ratio, rank_multiple=args.rank_multiple))
    result.update(ratio=args.ratio, ratio_params=count_params(smaller), ratio_seconds=time.perf_counter() - started)
    speeds = vitslim.benchmark([("original", model), (f"low-rank {args.ratio:.0%}", smaller)], batch_size=args.batch_size, runs=args.runs)
    result.update(batch_size=args.batch_size, runs=args.runs, bench=[s.as_dict() for s in speeds], throughput_ratio=speeds[1].ratio)
    print(f"{args.ratio:.0%} of the parameters: {speeds[1].ratio:.2f}x the original's throughput", flush=True)
    write(Path(args.out), result, args)


def write(out: Path, result: dict, args) -> None:
    common.write_json(out / "results.json", result)
    original, smaller = result["bench"]
    lines = [
        f"`{result['model']}` geometry (random init), {result['calib_images']} calibration images from "
        f"`{common.shown(args.data)}`, vitslim defaults (whitened, Fisher-weighted mixed ranks, "
        f"compensation), rank multiple {result['rank_multiple']}; CPU `{result['cpu']}`, {result['threads']} threads, float32.",
        "",
        common.machine_line(result["machine"]),
        "",
        "| run | parameters | result |",
        "|---|---|---|",
        f"| compress to `{args.like}`'s count (`--like`) | {result['like_params']:,} of {result['params']:,} (target {result['like_target']:,}) | "
        f"{result['like_seconds']:.0f} s, peak RSS {result['like_peak_rss_mb'] / 1024:.2f} GB |",
        f"| compress to {result['ratio']:.0%} | {result['ratio_params']:,} | {result['ratio_seconds']:.0f} s |",
        f"| throughput, batch {result['batch_size']}, median of {result['runs']} interleaved rounds | original {original['images_per_s']:.2f} img/s, "
        f"compressed {smaller['images_per_s']:.2f} img/s | **{result['throughput_ratio']:.2f}x** |",
    ]
    common.write_lines(out / "results.md", lines)
    print(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
