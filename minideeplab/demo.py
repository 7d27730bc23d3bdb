"""`make demo`: train DeepLabV3-DenseNet121 (output stride 16) on SyntheticShapes on the CPU, evaluate, draw.

Prints the configuration, one line per epoch (tqdm bars show loss and running IoU within an epoch), the final
validation metrics table, the wall time and seconds per training step. The run folder (default ``runs/demo``,
replaced by each demo) gets history.csv, last.npz, best.npz, curves.png and predictions.png.

Usage: ``python -m minideeplab.demo [--out DIR] [--quiet] [--threads N]``.
"""
from __future__ import annotations

import argparse
import sys
import time

from .metrics import format_metrics
from .train import TrainConfig, Trainer

# Chosen by short tuning runs on the shared 2-core CPU: 128 px images (at output stride 16 the logits are only
# 8x8; smaller images cap the IoU the upsampled logits can reach), AdamW at 2e-3 with a short warm-up and poly
# decay (4e-3 was slower), no augmentation (the synthetic images are plentiful and fresh). 360 steps of 8 images;
# a 240-step tuning run reached validation IoU 0.855, so the third epoch buys a margin.
DEMO_CONFIG = TrainConfig(
    data="shapes", model="densenet121", output_stride=16, image_size=128, epochs=3, batch_size=8,
    lr=2e-3, optimizer="adamw", weight_decay=1e-4, scheduler="poly", warmup_steps=15, loss="bce+dice",
    train_size=960, val_size=48, augment=False, device="cpu", seed=0,
)
TARGET_IOU = 0.85


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minideeplab.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads (via threadpoolctl; 0 = the library default). One thread measured as fast "
                             "as two on the shared 2-core machine, and two threads thrash when other processes "
                             "compete for the cores (23 s instead of 1.5 s per step)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            print("note: threadpoolctl is not installed, so --threads is ignored (pip install threadpoolctl)")
        else:
            threadpool_limits(args.threads)
    cfg = DEMO_CONFIG
    print("minideeplab demo: DeepLabV3 + DenseNet121 on SyntheticShapes, NumPy on the CPU")
    print("config: " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
    start = time.perf_counter()
    from tqdm import tqdm
    trainer = Trainer(cfg, out_dir=args.out, progress=not args.quiet, log=tqdm.write, log_every=50,
                      overwrite=True)      # each `make demo` replaces the last demo run
    n_params = sum(int(p.data.size) for p in trainer.model.parameters())
    print(f"model: {type(trainer.model).__name__}, {n_params / 1e6:.2f} M parameters; "
          f"{trainer.total_steps} training steps of {cfg.batch_size} images at {cfg.image_size}x{cfg.image_size}")
    trainer.fit()
    metrics = trainer.last_val      # the last epoch's validation, of the final weights
    wall = time.perf_counter() - start
    train_seconds = sum(row["seconds"] for row in trainer.history)
    print(format_metrics(metrics, title=f"validation ({len(trainer.val_set)} images) after {cfg.epochs} epochs"))
    print(f"wall time {wall / 60:.1f} min; {train_seconds / trainer.global_step:.2f} s per training step "
          f"(batch {cfg.batch_size})")
    print(f"figures and checkpoints in {args.out}/ (curves.png, predictions.png, history.csv, last.npz, best.npz)")
    reached = metrics["iou"] >= TARGET_IOU
    print(f"target validation IoU >= {TARGET_IOU}: {'reached' if reached else 'NOT reached'} ({metrics['iou']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
