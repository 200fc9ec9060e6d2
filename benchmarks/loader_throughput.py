"""Images per second of ``ttadapt finetune``'s training input pipeline (JPEG decode,
RandomResizedCrop 224, flip, normalise, per-sample seeded augmentation, collate), per number of
loader worker processes, beside the images per second one training step consumes.

    python benchmarks/loader_throughput.py [--images 512] [--workers 0 1 2] [--step-model resnet152]

The images are generated JPEGs of ImageNet's typical size (500×375). A GPU is never starved
when the loader's images/s exceed the step's; the step figure printed here is this machine's
(CPU) unless CUDA is present.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_images(root: Path, count: int, classes: int = 8) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(count):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = torch.rand(3, 1, 1, generator=g) * 255
        noise = torch.rand(3, 375, 500, generator=g) * 60
        pixels = (base + noise).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def loader_rate(root: Path, workers: int, batch: int, image_size: int, batches: int) -> float:
    from ttadapt.finetune.data import DataConfig, EpochSampler, SeededItems, image_transforms
    from ttadapt.data import imagefolder

    train_tf, _ = image_transforms(DataConfig(image_size=image_size), "imagenet")
    items = SeededItems(imagefolder(root, transform=train_tf), seed=0)
    sampler = EpochSampler(len(items), batch, seed=0)
    loader = DataLoader(items, batch_size=batch, sampler=sampler, drop_last=True, num_workers=workers,
                        generator=torch.Generator(), persistent_workers=workers > 0)
    it = iter(loader)
    next(it)  # start-up (worker spawn) is not throughput
    start = time.perf_counter()
    seen = 0
    for _ in range(batches):
        try:
            x, _ = next(it)
        except StopIteration:
            sampler.set_epoch(sampler.epoch + 1)
            it = iter(loader)
            x, _ = next(it)
        seen += len(x)
    return seen / (time.perf_counter() - start)


def step_rate(model_name: str, batch: int, image_size: int, device: torch.device, steps: int) -> float:
    from ttadapt import models as zoo

    torch.manual_seed(0)
    model = zoo.create(model_name).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--step-model", default="resnet152")
    parser.add_argument("--step-batch", type=int, default=4)
    parser.add_argument("--step-size", type=int, default=64, help="image size of the timed CPU training step")
    args = parser.parse_args()
    print(f"# loader_throughput — {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="ttadapt-loader-") as tmp:
        root = Path(tmp)
        make_images(root, args.images)
        print()
        print(f"| loader workers | images/s (batch {args.batch}, {args.image_size}×{args.image_size}, train augmentation) |")
        print("|---|---|")
        for w in args.workers:
            print(f"| {w} | {loader_rate(root, w, args.batch, args.image_size, args.batches):.0f} |", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size, batch = (args.image_size, args.batch) if device.type == "cuda" else (args.step_size, args.step_batch)
    rate = step_rate(args.step_model, batch, size, device, steps=3)
    print()
    print(f"{args.step_model} plain SGD step on {device} (batch {batch}, {size}×{size}): {rate:.1f} images/s consumed")


if __name__ == "__main__":
    main()
