"""The ``minideeplab`` command: train, evaluate, predict, bench.

Errors a user can cause (a bad path, a corrupt image, a file that is not a checkpoint, an invalid option) print
one line ``minideeplab <command>: error: ...`` to stderr and exit with a non-zero code, without a traceback.
Set ``MINIDEEPLAB_DEBUG=1`` to see the traceback of an unexpected error.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from .io import atomic_write

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage block)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _add_train(sub):
    p = sub.add_parser("train", help="train a DeepLabV3 (progress bars, checkpoints, figures)")
    a = p.add_argument
    a("--data", help="'shapes' (synthetic, default), 'shapes-fine' or 'shapes-context' (variants, docs/experiments.md), "
                     "or a folder with images/ and masks/ (or train/ and val/)")
    a("--model", choices=("densenet121", "small"), help="densenet121 (default) or the tiny 'small' config")
    a("--output-stride", type=int, choices=(8, 16, 32), help="backbone output stride (default 16)")
    a("--image-size", type=_positive(int), help="training image side in pixels (default 96)")
    a("--epochs", type=_positive(int))
    a("--batch-size", type=_positive(int))
    a("--lr", type=_positive(float), help="peak learning rate")
    a("--optimizer", choices=("sgd", "adam", "adamw"))
    a("--weight-decay", type=float)
    a("--scheduler", choices=("poly", "cosine", "constant"))
    a("--warmup-steps", type=int)
    a("--loss", help="bce, dice, focal, hinge, squared_hinge, or a sum such as bce+dice (default)")
    a("--train-size", type=_positive(int), help="synthetic training images")
    a("--val-size", type=_positive(int), help="synthetic validation images")
    a("--no-augment", dest="augment", action="store_const", const=False, help="no scale/crop/flip/jitter")
    a("--device", choices=("cpu", "cuda"))
    a("--seed", type=int)
    a("--out", help="run folder (default runs/<date-time>; with --resume, the checkpoint's folder)")
    a("--resume", metavar="CKPT", help="continue the run saved in CKPT (e.g. RUN/last.npz) with its settings")
    a("--quiet", action="store_true", help="no progress bars")
    a("--log-every", type=int, default=0, metavar="N", help="also print a line every N steps (for log files)")
    p.set_defaults(func=cmd_train)


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="print the metrics of a checkpoint on a dataset")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="'shapes' (the run's validation images, default) or a folder")
    p.add_argument("--image-size", type=_positive(int), help="default: the run's training size")
    p.add_argument("--val-size", type=_positive(int), help="synthetic images (default: the run's)")
    p.add_argument("--batch-size", type=_positive(int), default=8)
    p.add_argument("--seed", type=int, help="synthetic set seed (default: the run's)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.set_defaults(func=cmd_evaluate)


def _add_predict(sub):
    p = sub.add_parser("predict", help="write a mask PNG and an overlay PNG per image")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-size", type=int,
                   help="network input side (default: the run's training size; 0 = the image's own size)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.set_defaults(func=cmd_predict)


def _add_experiment(sub):
    sub.add_parser("experiment", help="output stride, eval stride, ASPP and test-time experiments over several "
                                      "seeds (see 'minideeplab experiment --help')")


def cmd_experiment(argv) -> int:
    from . import experiments
    try:
        return int(experiments.main(list(argv)) or 0)
    except SystemExit as e:          # --help (0) or a usage error (2, already printed on one line)
        return e.code if isinstance(e.code, int) else EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minideeplab", description="DeepLabV3 + DenseNet121 on NumPy/CuPy, for binary masks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,predict,bench,experiment}")
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    sub.add_parser("bench", help="performance benchmarks (minideeplab.bench; see 'minideeplab bench --help')")
    _add_experiment(sub)
    return parser


def _log(line: str) -> None:
    from tqdm import tqdm
    tqdm.write(line)


def cmd_train(args) -> int:
    from .metrics import format_metrics
    from .train import TrainConfig, Trainer, evaluate
    options = {k: v for k, v in vars(args).items()
               if k not in ("func", "command", "out", "resume", "quiet", "device", "log_every") and v is not None}
    if args.resume:
        if options:
            raise ValueError("--resume continues a run with its saved settings; only --out, --device and --quiet "
                             f"may be given with it (got --{min(options).replace('_', '-')})")
        trainer = Trainer.from_checkpoint(args.resume, out_dir=args.out, device=args.device,
                                          progress=not args.quiet, log=_log, log_every=args.log_every)
        if trainer.epoch >= trainer.cfg.epochs:
            _log(f"{args.resume}: the run already finished its {trainer.cfg.epochs} epoch(s); nothing to train")
        else:
            _log(f"resuming {args.resume} at epoch {trainer.epoch + 1}, step {trainer.global_step}")
    else:
        cfg = TrainConfig(**options)
        if args.device:
            cfg.device = args.device
        out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        trainer = Trainer(cfg, out_dir=out, progress=not args.quiet, log=_log, log_every=args.log_every)
    _log(f"run folder: {trainer.out_dir}  ({trainer.total_steps} steps, {trainer.cfg.model}, "
         f"{trainer.cfg.image_size}px, batch {trainer.cfg.batch_size})")
    finished = trainer.epoch >= trainer.cfg.epochs
    trainer.fit()
    # the last epoch's validation already measured the final weights; evaluate only a run that had nothing to train
    metrics = trainer.last_val or evaluate(trainer.model, trainer.val_loader, trainer.loss_fn,
                                           trainer.cfg.threshold, trainer.cfg.device)
    print(format_metrics(metrics, title=f"validation after {trainer.epoch} epoch(s)"))
    if not finished:
        print(f"wrote {trainer.out_dir}/history.csv, last.npz, best.npz, curves.png, predictions.png")
    return 0


def _eval_dataset(args, train_cfg: dict, image_size: int):
    from .data import FolderDataset, SyntheticShapes
    data = args.data or "shapes"
    if data == "shapes":
        n = args.val_size or train_cfg.get("val_size", 48)
        seed = args.seed if args.seed is not None else train_cfg.get("seed", 0)
        return SyntheticShapes(n, image_size, seed=seed, split=1), f"SyntheticShapes validation ({n} images)"
    root = Path(data)
    if not (root / "images").is_dir() and (root / "val").is_dir():
        root = root / "val"
    return FolderDataset(root, size=image_size), f"{root} ({image_size}px)"


def cmd_evaluate(args) -> int:
    from .checkpoint import load_model
    from .data import DataLoader
    from .metrics import format_metrics
    from .train import evaluate
    model, meta = load_model(args.checkpoint, device=args.device)
    train_cfg = meta.get("train_config", {})
    image_size = args.image_size or train_cfg.get("image_size", 96)
    dataset, label = _eval_dataset(args, train_cfg, image_size)
    loader = DataLoader(dataset, args.batch_size)
    metrics = evaluate(model, loader, threshold=args.threshold, device=args.device, progress=sys.stderr.isatty())
    print(format_metrics(metrics, title=f"{args.checkpoint} on {label}"))
    return 0


def _write_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image
    with atomic_write(path) as f:
        Image.fromarray(array).save(f, format="PNG")


def predict_probs(model, image: np.ndarray, size: int | None, device: str = "cpu") -> np.ndarray:
    """Foreground probability per pixel of an RGB image at its own size.

    The network runs at ``size x size`` (the training size; None for the image's own size) and the
    probabilities are resized back bilinearly. Shapes: image (H, W, 3) in [0, 1] -> (H, W) float32.
    """
    from .backend import to_device, to_numpy
    from .data.transforms import normalize, resize_bilinear
    H, W = image.shape[:2]
    x = resize_bilinear(image, (size, size)) if size else image
    x = np.transpose(normalize(x), (2, 0, 1))[None]
    model.eval()
    probs = to_numpy(model.predict_proba(to_device(np.ascontiguousarray(x), device)))[0, 0]
    return np.clip(resize_bilinear(probs, (H, W)), 0, 1) if size else probs


def cmd_predict(args) -> int:
    from .checkpoint import load_model
    from .data import load_image
    from .plots import overlay
    if args.image_size is not None and args.image_size < 0:
        raise ValueError(f"--image-size must be >= 0, got {args.image_size}")
    if not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    model, meta = load_model(args.checkpoint, device=args.device)
    size = args.image_size if args.image_size is not None else meta.get("train_config", {}).get("image_size")
    images = [(Path(p), load_image(p)) for p in args.images]      # every input is checked before writing
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, image in images:
        mask = predict_probs(model, image, size or None, args.device) > args.threshold   # as model.predict
        _write_png((mask * 255).astype(np.uint8), out / f"{path.stem}_mask.png")
        _write_png((overlay(image, mask) * 255).round().astype(np.uint8), out / f"{path.stem}_overlay.png")
        print(f"{path}: {image.shape[1]}x{image.shape[0]}, foreground {mask.mean():.1%} -> "
              f"{out / (path.stem + '_mask.png')}, {out / (path.stem + '_overlay.png')}")
    return 0


def cmd_bench(argv) -> int:
    try:
        from . import bench
    except ModuleNotFoundError as e:
        if e.name in ("minideeplab.bench", "bench"):
            raise ValueError("the benchmark module minideeplab.bench is not available in this installation") from None
        raise
    return int(bench.main(list(argv)) or 0)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {text}"


def main(argv=None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = argv[0] if argv else None
    try:
        if command == "bench":
            return cmd_bench(argv[1:])
        if command == "experiment":
            return cmd_experiment(argv[1:])
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:          # --help (0) or a usage error (2, already printed)
            return e.code if isinstance(e.code, int) else EXIT_USAGE
        return args.func(args)
    except KeyboardInterrupt:
        print(f"minideeplab {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if os.environ.get("MINIDEEPLAB_DEBUG"):
            raise
        print(f"minideeplab {command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
