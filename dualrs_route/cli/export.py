"""``dualrs-route export`` and ``dualrs-route bench``: thin click commands over :mod:`export`.

Library errors (:class:`experts.errors.DualRSError`) propagate to the ``dualrs-route``
group, which prints them as one-line messages with exit code 1; bad option values
raise ``click.BadParameter`` (exit code 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

_TARGETS = ("onnx", "int8", "tensorrt")


def _csv(kind, choices=None):
    def parse(ctx, param, value):
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            raise click.BadParameter("give at least one value")
        out = []
        for item in items:
            if kind is int:
                try:
                    item = int(item)
                except ValueError:
                    raise click.BadParameter(f"{item!r} is not an integer") from None
                if item < 1:
                    raise click.BadParameter(f"must be >= 1, got {item}")
            elif choices and item not in choices:
                raise click.BadParameter(f"{item!r} is not one of {', '.join(choices)}")
            out.append(item)
        return tuple(out)

    return parse


def _calibration_images(dataset: str | None, data: str | None, limit: int, seed: int, input_shape):
    if dataset is None:
        return None
    import numpy as np

    from dualrs_route.experts.data import load_dataset

    ds = load_dataset(dataset, split="train", data=data)
    if tuple(ds.input_shape) != tuple(input_shape):
        raise click.BadParameter(f"{dataset} has images of shape {list(ds.input_shape)} but the model takes "
                                 f"{list(input_shape)}", param_hint="--calibration-dataset")
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(ds), size=min(limit, len(ds)), replace=False))
    return ds.batch(picked)


@click.command("export")
@click.argument("reference", metavar="REF")
@click.option("--to", "target", type=click.Choice(_TARGETS), default="onnx", show_default=True,
              help="onnx: model.onnx; int8: model.int8.onnx (static QDQ, exports model.onnx first if missing); "
                   "tensorrt: a native TensorRT engine (needs a GPU and `pip install 'dualrs-route[gpu]'`).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write into a copy of the folder here (config.json copied) instead of into REF itself.")
@click.option("--copy-weights", is_flag=True, help="With --out: copy model.safetensors too (default: ONNX-only copy).")
@click.option("--opset", type=click.IntRange(min=13), default=17, show_default=True)
@click.option("--no-validate", is_flag=True, help="Skip the comparison of the ONNX graph against torch.")
@click.option("--fp16", is_flag=True, help="--to tensorrt: build with fp16 kernels.")
@click.option("--max-batch", type=click.IntRange(min=1), default=400, show_default=True,
              help="--to tensorrt: largest batch of the engine's dynamic-batch profile.")
@click.option("--device", default="cuda", show_default=True, help="--to tensorrt: the GPU to build for.")
@click.option("--calibration-dataset", default=None,
              help="--to int8 (and export validation): digits, cifar10 (with --data) or npz:PATH; its train split is "
                   "used. Without it, int8 calibrates on synthetic images (not recommended).")
@click.option("--data", default=None, metavar="PATH", help="Data location for --calibration-dataset cifar10.")
@click.option("--calibration-samples", type=click.IntRange(min=1), default=512, show_default=True,
              help="--to int8: noisy calibration inputs (images + noise at the model's sigma).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
def export_command(reference, target, out, copy_weights, opset, no_validate, fp16, max_batch, device,
                   calibration_dataset, data, calibration_samples, seed):
    """Export an expert or router folder REF for ONNX Runtime or TensorRT.

    The ONNX graph takes `pixels` float32 [batch, C, H, W] in [0, 1] (normalisation inside,
    dynamic batch) and returns `logits`. It is checked against torch at batch sizes 1, 7 and
    64 before model.onnx is written. A router's experts are separate folders: export each.
    """
    from dualrs_route.experts.folders import ONNX_FILE, load_folder

    from dualrs_route.export.onnx_export import export_onnx

    if fp16 and target != "tensorrt":
        raise click.BadParameter("--fp16 applies to --to tensorrt (for ONNX Runtime on the CPU use --to int8)",
                                 param_hint="--fp16")
    if copy_weights and out is None:
        raise click.BadParameter("--copy-weights needs --out", param_hint="--copy-weights")
    folder = load_folder(reference)
    images = _calibration_images(calibration_dataset, data, 1000, seed, folder.config.input_shape)
    onnx_path = (Path(out) if out else folder.path) / ONNX_FILE
    if target == "onnx" or not onnx_path.is_file() or out is not None:
        onnx_path = export_onnx(folder, out, opset=opset, validate=not no_validate, images=images,
                                copy_weights=copy_weights)
        click.echo(f"wrote {onnx_path}" + ("" if no_validate else " (validated against torch)"))
    if target == "int8":
        from dualrs_route.export.quantize import quantize_int8

        if images is None:
            click.echo("warning: calibrating int8 on synthetic images; pass --calibration-dataset for real ones",
                       err=True)
        path = quantize_int8(onnx_path.parent, images=images, samples=calibration_samples, seed=seed)
        click.echo(f"wrote {path} (static QDQ int8, calibrated at sigma={folder.config.sigma})")
    elif target == "tensorrt":
        from dualrs_route.export.tensorrt_engine import build_engine, engine_path

        precision = "fp16" if fp16 else "fp32"
        index = int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0
        if not device.startswith("cuda"):
            raise click.BadParameter("TensorRT engines are built for a GPU: use cuda or cuda:N", param_hint="--device")
        path = build_engine(onnx_path, engine_path(onnx_path.parent, precision), input_shape=folder.config.input_shape,
                            max_batch=max_batch, fp16=fp16, device_index=index)
        click.echo(f"wrote {path} ({precision}, batch 1..{max_batch})")


@click.command("bench")
@click.argument("reference", metavar="REF")
@click.option("--engine", "engines", default="torch,onnxruntime", show_default=True,
              callback=_csv(str, ("torch", "torch-compile", "onnxruntime", "tensorrt")),
              help="Comma-separated engines; torch-compile is the torch engine with --compile.")
@click.option("--precision", "precisions", default="fp32", show_default=True,
              callback=_csv(str, ("fp32", "bf16", "fp16", "int8")),
              help="Comma-separated precisions; pairs an engine cannot run are left out.")
@click.option("--batch", "batches", default="400", show_default=True, callback=_csv(int),
              help="Comma-separated batch sizes (noisy samples per forward pass).")
@click.option("--samples", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Noisy samples per throughput measurement.")
@click.option("--N0", "n0", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--N", "n", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Estimation samples for the seconds-per-certified-image figure.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch and ORT intra-op threads.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--peak-seconds", type=click.FloatRange(min=0.1), default=3.0, show_default=True,
              help="How long to measure the fp32 matmul peak.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the results here.")
def bench_command(reference, engines, precisions, batches, samples, n0, n, repeats, warmup, threads, device,
                  peak_seconds, seed, json_path):
    """Latency and throughput of an expert or router REF per engine, precision and batch size.

    Reports noisy samples/s, each engine's fraction of the FLOP-bound limit (measured fp32
    matmul peak, the best of torch's, numpy's and ONNX Runtime's GEMM at --threads, / counted
    FLOPs per sample; a share above 100% comes with a note that the bound is under-measured),
    the CPU model and its vector flags, seconds per certified image at --N and, for a
    router, the dual-certification overhead over its routed expert alone. Medians over
    --repeats after --warmup, engines measured round-robin.
    """
    from dualrs_route.router.bench import format_table, run_bench

    result = run_bench(reference, engines=engines, precisions=precisions, batch_sizes=batches, samples=samples,
                       n0=n0, n=n, repeats=repeats, warmup=warmup, threads=threads, device=device,
                       peak_seconds=peak_seconds, seed=seed, log=lambda m: click.echo(m, err=True))
    click.echo(format_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"results: {json_path}", err=True)
