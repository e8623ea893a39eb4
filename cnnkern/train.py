"""Train one of cnnkern's networks on a real data set that needs no download.

    cnnkern train cifar_resnet --depth 20 --epochs 5          # or: python -m cnnkern.train ...
    torchrun --nproc_per_node 8 -m cnnkern.train resnet18     # DistributedDataParallel, any node count

Data: scikit-learn's bundled handwritten digits (1,797 8x8 grey images of 0-9, shipped inside the
package), upsampled to ``--size`` pixels and replicated to 3 channels: small, but real images, so
loss and accuracy mean something. The first 1,500 images train, the other 297 test.

Under ``torchrun`` (WORLD_SIZE set) every process trains a shard (DistributedSampler) of a
DistributedDataParallel model, NCCL on GPUs and gloo on CPUs; rank 0 prints and checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from . import _backend, models

__all__ = ["load_digits", "main"]


def load_digits(size: int = 32):
    """(train_x, train_y, test_x, test_y): the digits as (N, 3, size, size) float32, normalised."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - x.mean()) / x.std()).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    return x[:1500], y[:1500], x[1500:], y[1500:]


def _build(args, num_classes: int):
    factory = getattr(models, args.net)
    kwargs = {"num_classes": num_classes}
    if args.net.startswith("cifar_"):
        kwargs["depth"] = args.depth
    if args.variant:
        kwargs["variant"] = args.variant
    return factory(**kwargs)


def _evaluate(model, x, y, batch, device) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(x[i : i + batch].to(device))
            correct += (out.argmax(1).cpu() == y[i : i + batch]).sum().item()
    model.train()
    return correct / max(len(x), 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cnnkern train", description=__doc__.split("\n\n")[0])
    ap.add_argument("net", help="a factory in cnnkern.models (e.g. cifar_resnet, cifar_plain, resnet18, vgg11)")
    ap.add_argument("--depth", type=int, default=20, help="depth of cifar_resnet / cifar_plain")
    ap.add_argument("--variant", help="the factory's variant argument, where it has one")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64, help="per-process batch size")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--size", type=int, default=32, help="image side after upsampling the 8x8 digits")
    ap.add_argument("--backend", default=None, help="cnnkern backend (default: CNNKERN_BACKEND or auto)")
    ap.add_argument("--channels-last", action="store_true", help="NHWC activations and weights (GPU fast path)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (smoke runs)")
    ap.add_argument("--checkpoint", default="cnnkern-train.pt", help="where rank 0 saves the last epoch")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    ap.add_argument("--log", default=None, help="rank 0 appends one JSON line per epoch (metrics) to this file")
    args = ap.parse_args(argv)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, world, local = 0, 1, 0
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.backend:
        _backend.set_backend(args.backend)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts them)

    train_x, train_y, test_x, test_y = load_digits(args.size)
    model = _build(args, 10).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = (
        torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)
        if distributed
        else model
    )
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    sampler = (
        torch.utils.data.DistributedSampler(
            torch.utils.data.TensorDataset(train_x, train_y), world, rank, shuffle=True, seed=args.seed
        )
        if distributed
        else None
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(train_x, train_y),
        batch_size=args.batch,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
    )
    if rank == 0:
        print(
            f"cnnkern train: {args.net} on the digits ({len(train_x)} train / {len(test_x)} test, "
            f"{args.size}x{args.size}), {world} process(es) on {device.type}, backend "
            f"{_backend.get_backend()}, batch {args.batch} per process",
            flush=True,
        )
    step = 0
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        t0, seen, total_loss, correct = time.time(), 0, 0.0, 0
        bar = loader
        if rank == 0 and not args.no_progress:
            try:
                from tqdm import tqdm

                bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
            except ImportError:
                pass
        for xb, yb in bar:
            xb = xb.to(device).contiguous(memory_format=fmt)
            yb = yb.to(device)
            out = net(xb)
            loss = torch.nn.functional.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(yb)
            total_loss += loss.item() * len(yb)
            correct += (out.argmax(1) == yb).sum().item()
            step += 1
            if args.max_steps and step >= args.max_steps:
                break
        if rank == 0:
            acc = _evaluate(model, test_x, test_y, args.batch, device)
            print(
                f"epoch {epoch + 1}: train loss {total_loss / max(seen, 1):.4f}, train acc "
                f"{correct / max(seen, 1):.3f} (rank 0's shard), test acc {acc:.3f}, {time.time() - t0:.1f} s",
                flush=True,
            )
            if args.log:
                with open(args.log, "a") as f:
                    f.write(
                        json.dumps(
                            {
                                "net": args.net,
                                "depth": args.depth if args.net.startswith("cifar_") else None,
                                "seed": args.seed,
                                "epoch": epoch + 1,
                                "steps": step,
                                "train_loss": total_loss / max(seen, 1),
                                "train_error": 1 - correct / max(seen, 1),
                                "test_error": 1 - acc,
                                "seconds": time.time() - t0,
                                "backend": _backend.get_backend(),
                                "device": device.type,
                            }
                        )
                        + "\n"
                    )
            torch.save(
                {"net": args.net, "epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict()},
                args.checkpoint,
            )
        if args.max_steps and step >= args.max_steps:
            break
    if rank == 0:
        print(f"checkpoint: {args.checkpoint}", flush=True)
    if distributed:
        # Leave together, with DDP's reducer (which holds the process group) released first: a rank that
        # tore its group down while rank 0 still evaluated and saved could abort in gloo's teardown.
        del net
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
