"""Prints the throughput table: images/s and s/step of AA-CLIP (ours vs original) and siblings.

Test-time images/s and seconds per training step, AA-CLIP ours vs the original, and the sibling
models (FE-CLIP, SOWA) in fp32 and under autocast.

    python benchmarks/throughput.py                                   # ViT-L-14-336 at 224 px, CPU
    python benchmarks/throughput.py --model_name tiny --img_size 64   # seconds
    python benchmarks/throughput.py --img_size 518 --device cuda

"straightforward" is the original's way of doing the same work: attention through the slow
weights-returning path, and in stage 1 a second CLIP copy for the surgery features, a separate
full clean pass for the CLS embedding, and all four level maps computed though only the last
one is used. "ours" is the fused attention, one CLIP, a shared block prefix and the last map
only. Every row runs in its own process so that its peak memory (RSS on CPU, allocated memory
on CUDA) is its own. Random weights: speed does not depend on them. Next to each autocast row,
and to the straightforward one, is how far its maps move from ours in fp32 (max |diff| over
the map's range), and a last table shows how the synthetic test set's metrics move. The
speed-up column is the ratio to the first row of the same group: the straightforward path for
AA-CLIP, fp32 for the sibling models (which have no original code to compare with here). The
last column is the CPU's kind (vector capability, native bf16, AMX), which decides the ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import backbone  # noqa: E402
from models.aaclip import AAClip, stage1_loss  # noqa: E402
from models.base import FrozenCLIPModel  # noqa: E402
from models.forward_utils import (  # noqa: E402
    calculate_seg_loss,
    calculate_similarity_map,
    get_adapted_single_class_text_embedding,
)
from models.registry import model_class  # noqa: E402
from utils.core.config import HelpFormatter  # noqa: E402
from utils.core.runtime import cpu_kind, grad_scaler, peak_rss_bytes, resolve_device  # noqa: E402
from utils.engine.training import StageForward, training_step  # noqa: E402
from utils.inference.predictor import AnomalyPredictor  # noqa: E402

CLASS = "tile"  # a Synthetic class: the training stages look its anchors up

ROWS = {
    "inference/straightforward": ("inference", "straightforward", "none"),
    "inference/ours": ("inference", "ours", "none"),
    "inference/ours+amp": ("inference", "ours", "amp"),
    "stage 1/straightforward": ("stage1", "straightforward", "none"),
    "stage 1/ours": ("stage1", "ours", "none"),
    "stage 1/ours+amp": ("stage1", "ours", "amp"),
    "stage 2/straightforward": ("stage2", "straightforward", "none"),
    "stage 2/ours": ("stage2", "ours", "none"),
    "stage 2/ours+amp": ("stage2", "ours", "amp"),
    "FE-CLIP inference/ours": ("feclip inference", "ours", "none"),
    "FE-CLIP inference/ours+amp": ("feclip inference", "ours", "amp"),
    "FE-CLIP train/ours": ("feclip train", "ours", "none"),
    "FE-CLIP train/ours+amp": ("feclip train", "ours", "amp"),
    "SOWA inference/ours": ("sowa inference", "ours", "none"),
    "SOWA inference/ours+amp": ("sowa inference", "ours", "amp"),
    "SOWA train/ours": ("sowa train", "ours", "none"),
    "SOWA train/ours+amp": ("sowa train", "ours", "amp"),
}


@contextmanager
def weights_returning_attention():
    """Make every standard block run the weights-returning attention, as the original walks."""
    original = backbone.run_block

    def run_block(block, x, attention="standard", attn_mask=None):
        rule = "weights_returning" if attention == "standard" else attention
        return original(block, x, rule, attn_mask)

    backbone.run_block = run_block
    try:
        yield
    finally:
        backbone.run_block = original


def build_model(name: str, args: argparse.Namespace, device: torch.device) -> FrozenCLIPModel:
    """A registered model at its default settings on the benchmark's backbone, random weights."""
    model = model_class(name)
    config = model.config_class(model_name=args.model_name, pretrained="", img_size=args.img_size)
    return model.from_config(config, device)


def straightforward_surgery_features(
    model: AAClip, surgery_clip, images: torch.Tensor
) -> list[torch.Tensor]:
    """Stage-1 features the original's way: a second CLIP copy walked from the start, and a full
    separate clean pass for the CLS embedding."""
    with torch.no_grad():
        cls = torch.nn.functional.normalize(model.clipmodel.encode_image(images), dim=-1)
        first = model.surgery_blocks().start
        levels = []

        def record(index, tokens):
            if index in model.config.block_indices:
                levels.append(tokens[:, 1:])
            return tokens

        rule = lambda index: "vv_batch_mix" if index >= first else "standard"  # noqa: E731
        x = backbone.vision_embed(surgery_clip, images)
        backbone.walk_vision(surgery_clip, x, record, attention=rule)
        return [
            torch.nn.functional.normalize(backbone.project_image_tokens(surgery_clip, t), dim=-1)
            + cls[:, None]
            for t in levels
        ]


def random_batch(args: argparse.Namespace, device: torch.device) -> dict:
    """A training batch: image `[B, 3, S, S]`, mask `[B, 1, S, S]`, label `[B]` (seeded)."""
    generator = torch.Generator().manual_seed(0)
    size = (args.batch_size, 1, args.img_size, args.img_size)
    return {
        "image": torch.randn(args.batch_size, 3, *size[2:], generator=generator).to(device),
        "mask": (torch.rand(size, generator=generator) > 0.9).float().to(device),
        "label": torch.randint(0, 2, (args.batch_size,), generator=generator).to(device),
        "class_name": [CLASS] * args.batch_size,
    }


def inference_step(model: FrozenCLIPModel, amp: str, batch: dict) -> Callable[[], torch.Tensor]:
    """The test-time forward + map, as test.py runs it (class anchors cached by the predictor)."""
    predictor = AnomalyPredictor(model, amp=amp)

    def step():
        with torch.inference_mode():
            return predictor.predict(batch["image"], batch["class_name"]).anomaly_map

    return step


def fit_step(model: FrozenCLIPModel, stage_index: int, amp: str, batch: dict) -> Callable:
    """One step of a training stage exactly as `utils.engine.training.fit` takes it."""
    stage = model.stages()[stage_index]
    model.prepare_stage(stage, "Synthetic")
    optimizer, _ = model.configure_optimizer(stage)
    forward = StageForward(model, stage)
    scaler = grad_scaler(model.device, amp)
    model.train()
    return lambda: training_step(forward, model, batch, optimizer, scaler, amp)


def straightforward_step(kind: str, model: AAClip, args, batch: dict) -> Callable:
    """A stage-1 or stage-2 step the original's way (fp32)."""
    images, masks, labels = batch["image"], batch["mask"], batch["label"]
    device = images.device
    text = model.class_text(CLASS).expand(args.batch_size, -1, -1)
    model.train()
    if kind == "stage1":
        optimizer = torch.optim.Adam(model.text_adapter.parameters(), lr=1e-5)
        model.image_adapter.requires_grad_(False)
        surgery_clip = copy.deepcopy(model.clipmodel)

        def step():
            anchors = get_adapted_single_class_text_embedding(model, CLASS, device)
            features = straightforward_surgery_features(model, surgery_clip, images)
            anchors = anchors.float().expand(args.batch_size, -1, -1)
            maps = [calculate_similarity_map(f, anchors, args.img_size) for f in features]
            loss = stage1_loss(maps, masks, anchors, 0.1, "last_level")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return step
    optimizer = torch.optim.Adam(model.image_adapter.parameters(), lr=5e-4)
    model.text_adapter.requires_grad_(False)

    def step():
        seg_tokens, det_token = model(images)
        logits = torch.matmul(det_token.float().unsqueeze(1), text)[:, 0]
        loss = torch.nn.functional.cross_entropy(logits, labels)
        for tokens in seg_tokens:
            loss = loss + calculate_seg_loss(
                calculate_similarity_map(tokens, text, args.img_size), masks
            )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def make_step(kind: str, straightforward: bool, amp: str, args, batch: dict) -> Callable:
    """One unit of work of a row: a test-time forward + map, or one training step."""
    name, _, task = kind.partition(" ")
    if name in ("inference", "stage1", "stage2"):  # AA-CLIP's rows
        name, task = "aaclip", name
    model = build_model(name, args, batch["image"].device)
    if task == "inference":
        return inference_step(model, amp, batch)
    if straightforward:
        return straightforward_step(task, model, args, batch)
    return fit_step(model, 1 if task == "stage2" else 0, amp, batch)


def measure_row(name: str, args: argparse.Namespace) -> dict:
    """Time one row in this process; returns seconds per call, peak memory and map deviation."""
    kind, way, precision = ROWS[name]
    straightforward = way == "straightforward"
    amp = args.amp if precision == "amp" else "none"
    device = resolve_device(args.device)
    torch.manual_seed(0)
    batch = random_batch(args, device)
    step = make_step(kind, straightforward, amp, args, batch)
    context = weights_returning_attention() if straightforward else nullcontext()
    with context:
        step()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            output = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
    result = {"seconds": seconds, "peak_gib": peak_memory_gib(device)}
    if kind.endswith("inference") and (amp != "none" or straightforward):  # after the timing
        torch.manual_seed(0)
        reference = make_step(kind, False, "none", args, batch)()
        span = (reference.max() - reference.min()).item()
        result["map_deviation"] = (output - reference).abs().max().item() / span
    return result


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_bytes() / 2**30  # this process's own (VmHWM)


def synthetic_metric_shift(args: argparse.Namespace) -> dict:
    """Pixel/image AUROC and AUPRO on the synthetic test set, fp32 vs autocast."""
    import numpy as np

    from datasets.anomaly import build_test_datasets
    from datasets.items import collate_items
    from datasets.metadata import load_test_records
    from datasets.preprocessing import Preprocessing
    from datasets.synthetic import ensure_synthetic
    from models.aaclip import aaclip_image_scores
    from models.base import MapExtrema
    from utils.evaluation.metrics import evaluate_class

    device = resolve_device(args.device)
    root = ensure_synthetic(Path(args.synthetic_root))
    model = build_model("aaclip", args, device)
    datasets = build_test_datasets(
        load_test_records("Synthetic", root), root, Preprocessing(args.img_size)
    )
    shifts: dict[str, list[float]] = {"P-AUROC": [], "AUPRO": [], "I-AUROC": []}
    for dataset in datasets.values():
        indices = range(0, len(dataset), max(1, len(dataset) // args.metric_images))
        items = [dataset[i] for i in indices]
        batch = collate_items(items)
        scores = {}
        for amp in ("none", args.amp):
            with torch.inference_mode():
                output = AnomalyPredictor(model, amp=amp).predict(
                    batch.images, [item.class_name for item in items]
                )
            maps = output.anomaly_map.cpu().numpy()
            det = output.image_score.cpu().numpy()
            image_scores = aaclip_image_scores(MapExtrema.of(maps), det, "Industrial")
            scores[amp] = evaluate_class(
                maps,
                np.stack([item.mask[0].numpy().astype(bool) for item in items]),
                image_scores,
                np.array([item.label for item in items]),
                list(shifts),
            )
        for column in shifts:
            shifts[column].append(abs(scores[args.amp][column] - scores["none"][column]))
    return {column: float(np.nanmax(values)) for column, values in shifts.items()}


def run_in_subprocess(task: list[str], args: argparse.Namespace) -> dict:
    """Run one measurement in a fresh process (its own peak memory); its last line is JSON."""
    command = [
        sys.executable,
        __file__,
        *task,
        "--model_name",
        args.model_name,
        "--img_size",
        str(args.img_size),
        "--batch_size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        "--amp",
        args.amp,
        "--metric_images",
        str(args.metric_images),
        "--synthetic_root",
        args.synthetic_root,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{task} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--model_name", default="ViT-L-14-336", help="backbone, e.g. tiny for a check in seconds"
    )
    parser.add_argument("--img_size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--batch_size", type=int, default=2, help="images per timed call")
    parser.add_argument(
        "--steps", type=int, default=2, help="timed calls per row, after one warm-up call"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ..."
    )
    parser.add_argument(
        "--amp",
        default="bf16",
        choices=("bf16", "fp16"),
        help="autocast precision of the '+amp' rows",
    )
    parser.add_argument(
        "--metric_images",
        type=int,
        default=8,
        help="images per synthetic class in the metric-shift line; 0 leaves it out",
    )
    parser.add_argument(
        "--synthetic_root",
        default="data/Synthetic",
        help="the synthetic set of the metric-shift line, generated there when missing",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        default=None,
        choices=list(ROWS),
        metavar="ROW",
        help="time only these rows and leave out the metric-shift line, of: %(choices)s "
        "(default: all rows)",
    )
    parser.add_argument("--row", choices=sorted(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--metric_shift", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        print(json.dumps(measure_row(args.row, args)))
        return 0
    if args.metric_shift:
        print(json.dumps(synthetic_metric_shift(args)))
        return 0

    device = resolve_device(args.device)
    print(
        f"Throughput: {args.model_name}, {args.img_size} px, batch {args.batch_size}, "
        f"{device} ({torch.get_num_threads()} threads), autocast {args.amp} for '+amp' rows\n"
    )
    print("| row | images/s | s/step | peak GiB | speed-up | maps vs fp32 | CPU |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    baselines = {}
    for name, (kind, _, _) in ROWS.items():
        if args.rows and name not in args.rows:
            continue
        result = run_in_subprocess(["--row", name], args)
        seconds = result["seconds"]
        baselines.setdefault(kind, seconds)  # the kind's first row: straightforward or fp32
        ratio = baselines[kind] / seconds
        inference = kind.endswith("inference")
        throughput = f"{args.batch_size / seconds:.3g}" if inference else ""
        step = "" if inference else f"{seconds:.3f}"
        deviation = f"{result['map_deviation']:.2%}" if "map_deviation" in result else ""
        print(
            f"| {name} | {throughput} | {step} | {result['peak_gib']:.2f} | {ratio:.2f}x "
            f"| {deviation} | {cpu_kind()} |",
            flush=True,
        )
    shift = {}
    if args.metric_images and not args.rows:
        shift = run_in_subprocess(["--metric_shift"], args)
    if shift:
        print(
            f"\nSynthetic test set ({args.metric_images} images per class), largest per-class "
            f"|{args.amp} - fp32|: " + ", ".join(f"{k} {v:.4f}" for k, v in shift.items())
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
