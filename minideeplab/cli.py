"""The ``minideeplab`` command: train, evaluate, predict, bench, exercises.

Errors a user can cause (a bad path, a corrupt image, a file that is not a checkpoint, an invalid option) print
one line ``minideeplab <command>: error: ...`` to stderr and exit with a non-zero code, without a traceback.
Set ``MINIDEEPLAB_DEBUG=1`` to see the traceback of an unexpected error. Exit codes: 1 error, 2 usage, 3 training
diverged, 128 + the signal's number after a stop (130 Ctrl-C, 141 broken pipe, 143 SIGTERM).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from .data.decode import VOID_CHOICES
from .io import atomic_write

EXIT_ERROR, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_SIGPIPE, EXIT_SIGTERM = 1, 2, 3, 130, 141, 143


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
    a("--mask-void", choices=VOID_CHOICES, help="void pixels of VOC-style masks (index 255) become background "
      "(default) or object, or are refused (error); see docs/cli.md, 'Data'")
    a("--no-augment", dest="augment", action="store_const", const=False, help="no scale/crop/flip/jitter")
    a("--device", choices=("cpu", "cuda"))
    a("--no-cuda-graph", dest="cuda_graph", action="store_const", const=False,
      help="on cuda: run the steps eagerly instead of replaying them as CUDA graphs")
    a("--backbone-weights", metavar="PTH", help="start from torchvision's DenseNet-121 weights in this .pth file "
      "(densenet121-a639ec97.pth; needs torch)")
    a("--seed", type=int)
    a("--out", help="run folder (default runs/<date-time>; with --resume, the checkpoint's folder)")
    a("--resume", metavar="CKPT", help="continue the run saved in CKPT (e.g. RUN/last.npz) with its settings")
    a("--overwrite", action="store_true", help="replace the run found in --out (refused without this flag)")
    a("--quiet", action="store_true", help="no progress bars")
    a("--log-every", type=int, default=0, metavar="N", help="also print a line every N steps (for log files)")
    p.set_defaults(func=cmd_train)


def _scales(text):
    """``--scales 0.5,0.75,1``: one or more positive numbers, comma-separated."""
    try:
        scales = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,1,1.5, got {text!r}") from None
    if not all(0 < s < float("inf") for s in scales):
        raise argparse.ArgumentTypeError(f"every scale must be a positive number, got {text!r}")
    return scales


def _add_inference_options(p) -> None:
    """``--output-stride``, ``--scales``/``--multi-scale`` and ``--flip`` of evaluate and predict (inference.py)."""
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32),
                   help="run the network at this output stride with the same weights (e.g. trained at 16, "
                        "evaluated at 8; default: the checkpoint's)")
    scales = p.add_mutually_exclusive_group()
    scales.add_argument("--scales", type=_scales, metavar="S,S,...",
                        help="average the probabilities over these input scales (e.g. 0.75,1,1.25; default 1)")
    scales.add_argument("--multi-scale", action="store_true",
                        help="the paper's scales 0.5,0.75,1,1.25,1.5,1.75 (same as --scales with them)")
    p.add_argument("--flip", action="store_true", help="also average over the left-right mirrored images")


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="print the metrics and the loss of a checkpoint on a dataset")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="'shapes' or a folder (default: the run's own data)")
    p.add_argument("--split", choices=("val", "train", "all"),
                   help="which images: default 'val' on the run's own data (its validation set), 'all' on another "
                        "folder")
    p.add_argument("--image-size", type=_positive(int), help="default: the run's training size")
    p.add_argument("--val-size", type=_positive(int), help="synthetic images (default: the run's)")
    p.add_argument("--batch-size", type=_positive(int), default=8)
    p.add_argument("--seed", type=int, help="synthetic set seed (default: the run's)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--mask-void", choices=VOID_CHOICES, help="default: the run's (see train --mask-void)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    _add_inference_options(p)
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
    _add_inference_options(p)
    p.set_defaults(func=cmd_predict)


def _add_exercises(sub):
    from .exercises.cli import add_parser  # exercises new/check/list (docs/exercises.md)
    add_parser(sub)


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,predict,bench,exercises,experiment}")
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    sub.add_parser("bench", help="performance benchmarks (minideeplab.bench; see 'minideeplab bench --help')")
    _add_exercises(sub)
    _add_experiment(sub)
    return parser


def _log(line: str) -> None:
    from tqdm import tqdm
    tqdm.write(line)


def cmd_train(args) -> int:
    from .checkpoint import load_checkpoint
    from .metrics import format_metrics
    from .runfolder import RUN_FILES, RunFolder, new_run_dir, run_id_of
    from .train import TrainConfig, Trainer, evaluate
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)     # log lines reach a pipe (tee, head) as they are printed
    options = {k: v for k, v in vars(args).items() if v is not None and k not in
               ("func", "command", "out", "resume", "quiet", "device", "log_every", "overwrite")}
    settings = {"progress": not args.quiet, "log": _log, "log_every": args.log_every, "overwrite": args.overwrite}
    if args.resume:
        if options:
            raise ValueError("--resume continues a run with its saved settings; only --out, --device, --quiet, "
                             f"--log-every and --overwrite may be given with it (got --{min(options).replace('_', '-')})")
        ckpt = load_checkpoint(args.resume)
        out = Path(args.out) if args.out else Path(args.resume).parent
        # the run folder is checked before the data sets are (the lock is taken when training starts)
        RunFolder(out).check(run_id_of(ckpt.meta), int(ckpt.meta.get("global_step", 0)), args.overwrite)
        trainer = Trainer.from_checkpoint(ckpt, out_dir=out, device=args.device, **settings)
        if trainer.epoch >= trainer.cfg.epochs:
            _log(f"{args.resume}: the run already finished its {trainer.cfg.epochs} epoch(s); nothing to train")
        else:
            _log(f"resuming {args.resume} at epoch {trainer.epoch + 1}, step {trainer.global_step}")
    else:
        cfg = TrainConfig(**options)
        if args.device:
            cfg.device = args.device
        cfg.validate()
        if args.out:
            RunFolder(args.out).check(None, 0, args.overwrite)
        out = args.out or new_run_dir("runs")
        try:
            trainer = Trainer(cfg, out_dir=out, **settings)
        except BaseException:
            if not args.out:                # a bad data folder, Ctrl-C...: leave no empty runs/<date-time>
                try:
                    Path(out).rmdir()
                except OSError:
                    pass
            raise
    _log(f"run folder: {trainer.out_dir}  ({trainer.total_steps} steps, {trainer.cfg.model}, "
         f"{trainer.cfg.image_size}px, batch {trainer.cfg.batch_size})")
    trainer.fit()
    # the last epoch's validation already measured the final weights; evaluate only a run that had nothing to train
    metrics = trainer.last_val or evaluate(trainer.model, trainer.val_loader, trainer.loss_fn,
                                           trainer.cfg.threshold, trainer.cfg.device)
    print(format_metrics(metrics, title=f"validation after {trainer.epoch} epoch(s)"))
    print(f"run folder {trainer.out_dir}: {', '.join(n for n in RUN_FILES if (trainer.out_dir / n).exists())}")
    return 0


def _eval_dataset(args, meta: dict, minimum: int, scales=(1.0,)):
    """``(dataset, label, config)`` for ``evaluate``: the run's config (``train.TrainConfig``; its defaults for a
    weights-only file) with the options given, and the images ``data.run_data.evaluation_set`` picks."""
    from .data.run_data import evaluation_set
    from .train import TrainConfig
    cfg = TrainConfig.from_dict(meta.get("train_config") or {})
    for key in ("image_size", "val_size", "seed", "mask_void"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if cfg.image_size < minimum:
        raise ValueError(f"--image-size {cfg.image_size} is too small for this network: it needs at least "
                         f"{minimum}x{minimum} pixels at its output stride")
    _check_scaled_size(cfg.image_size, cfg.image_size, scales, minimum, "--image-size")
    dataset, label = evaluation_set(cfg, args.data, args.split, meta.get("data_fingerprint"))
    return dataset, label, cfg


def _inference_settings(args, model) -> tuple[tuple, bool, str]:
    """Apply ``--output-stride`` to ``model`` (``models.set_output_stride``: the same weights, pools dropped or put
    back, dilations and ASPP rates rescaled) and return ``(scales, flip, words)``: what ``inference.predict_proba``
    needs and a phrase for the output's title ("" when nothing differs from a plain forward)."""
    from .inference import PAPER_SCALES
    words = []
    own = model.output_stride
    if args.output_stride is not None and args.output_stride != own:
        from .models import set_output_stride
        try:
            set_output_stride(model, args.output_stride)
        except ValueError as e:
            raise ValueError(f"--output-stride {args.output_stride}: the checkpoint's network (output stride {own}, "
                             f"ASPP rates {model.rates}) cannot be switched: {e}") from None
        words.append(f"output stride {args.output_stride} (trained at {own})")
    scales = PAPER_SCALES if args.multi_scale else (args.scales or (1.0,))
    if scales != (1.0,):
        words.append(f"scales {','.join(f'{s:g}' for s in scales)}")
    if args.flip:
        words.append("flip")
    return scales, bool(args.flip), ", ".join(words)


def _check_scaled_size(height: int, width: int, scales, minimum: int, what: str) -> None:
    """Each scale's network input (round(s·H) x round(s·W), as ``inference.predict_proba`` resizes) must be at least
    ``minimum`` pixels a side; refused before anything runs, naming the scale."""
    for s in scales:
        h, w = max(1, round(height * s)), max(1, round(width * s))
        if min(h, w) < minimum:
            raise ValueError(f"scale {s:g} of {what} ({width}x{height} pixels) gives a {w}x{h} network input, "
                             f"smaller than the network's minimum {minimum}x{minimum} at its output stride; drop "
                             "that scale or use larger images")


def cmd_evaluate(args) -> int:
    from .checkpoint import load_model
    from .data import DataLoader
    from .losses import build_loss
    from .metrics import format_metrics
    from .train import evaluate
    model, meta = load_model(args.checkpoint, device=args.device)
    scales, flip, words = _inference_settings(args, model)
    dataset, label, cfg = _eval_dataset(args, meta, model.min_input_size, scales)
    loader = DataLoader(dataset, args.batch_size)
    progress = sys.stderr.isatty()
    if scales == (1.0,) and not flip:       # one forward per batch: its logits also give the loss
        metrics = evaluate(model, loader, build_loss(cfg.loss), threshold=args.threshold, device=args.device,
                           progress=progress)
        title = f"{args.checkpoint} on {label}{f', {words}' if words else ''} (loss: {cfg.loss})"
    else:                                   # averaged probabilities: no logits, so no loss
        from .inference import evaluate_model
        metrics = evaluate_model(model, loader, scales=scales, flip=flip, threshold=args.threshold,
                                 device=args.device, progress=progress)
        metrics.pop("seconds_per_image", None)
        title = f"{args.checkpoint} on {label}, {words} (probabilities averaged: no loss)"
    print(format_metrics(metrics, title=title))
    return 0


def _write_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image
    with atomic_write(path) as f:      # its OSError (full disk, read-only folder) names ``path``
        Image.fromarray(array).save(f, format="PNG")


def _output_paths(inputs: list[Path], out: Path) -> list[tuple[Path, Path, Path]]:
    """``(input, mask path, overlay path)`` per distinct input. Inputs that share a stem (``a/x.png``, ``b/x.jpg``)
    get their extension in the name (``x_png_mask.png``, ``x_jpg_mask.png``); names that still collide, and an
    output that would overwrite an input, are refused before anything is written."""
    distinct, resolved = [], set()
    for p in inputs:                       # the same file given twice is predicted once
        if p.resolve() not in resolved:
            resolved.add(p.resolve())
            distinct.append(p)
    stems = [p.stem.lower() for p in distinct]
    names = [p.stem if stems.count(p.stem.lower()) == 1 else f"{p.stem}_{p.suffix.lstrip('.')}" for p in distinct]
    seen = {}
    for p, name in zip(distinct, names):
        other = seen.setdefault(name.lower(), p)
        if other is not p:
            raise ValueError(f"{str(other)!r} and {str(p)!r} have the same name: both masks would be written to "
                             f"{name}_mask.png in {str(out)!r}; predict them into separate --out folders or rename one")
    planned = [(p, out / f"{name}_mask.png", out / f"{name}_overlay.png") for p, name in zip(distinct, names)]
    for _, mask_path, overlay_path in planned:
        for target in (mask_path, overlay_path):
            if target.resolve() in resolved:
                raise ValueError(f"writing {str(target)!r} would overwrite an input image; choose another --out")
    return planned


def _check_network_size(size: int | None, images, minimum: int) -> None:
    """The network input of ``predict`` (``size``, or each image's own size when None) must be at least
    ``minimum`` pixels a side: refused before anything runs, naming the image."""
    if size and size < minimum:
        raise ValueError(f"--image-size {size} is too small for this network: it needs at least {minimum}x{minimum} "
                         "pixels at its output stride")
    for path, image in images if not size else ():
        if min(image.shape[:2]) < minimum:
            raise ValueError(f"image {str(path)!r} is {image.shape[1]}x{image.shape[0]} pixels, smaller than the "
                             f"network's minimum {minimum}x{minimum}; pass --image-size N to resize it")


def predict_probs(model, image: np.ndarray, size: int | None, device: str = "cpu", scales=(1.0,),
                  flip: bool = False) -> np.ndarray:
    """Foreground probability per pixel of an RGB image at its own size.

    The network runs at ``size x size`` (the training size; None for the image's own size), averaged over
    ``scales`` and (``flip``) mirror images by ``inference.predict_proba``, and the probabilities are resized back
    bilinearly. Logits that are not finite raise (NaN weights would otherwise print "foreground 0.0%").
    Shapes: image (H, W, 3) in [0, 1] -> (H, W) float32.
    """
    from .backend import to_device, to_numpy
    from .data.transforms import normalize, resize_bilinear
    from .inference import predict_proba
    H, W = image.shape[:2]
    x = resize_bilinear(image, (size, size)) if size else image
    x = np.transpose(normalize(x), (2, 0, 1))[None]
    probs = to_numpy(predict_proba(model, to_device(np.ascontiguousarray(x), device), scales, flip))[0, 0]
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
    scales, flip, words = _inference_settings(args, model)
    size = args.image_size if args.image_size is not None else meta.get("train_config", {}).get("image_size")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder")
    planned = _output_paths([Path(p) for p in args.images], out)
    images = [load_image(p) for p, _, _ in planned]          # every input is checked before writing
    _check_network_size(size, [(p, im) for (p, _, _), im in zip(planned, images)], model.min_input_size)
    if size:
        _check_scaled_size(size, size, scales, model.min_input_size, f"--image-size {size}")
    for (path, _, _), image in zip(planned, images) if not size else ():
        _check_scaled_size(*image.shape[:2], scales, model.min_input_size, f"image {str(path)!r}")
    if words:
        print(f"predicting with {words}")
    out.mkdir(parents=True, exist_ok=True)
    for (path, mask_path, overlay_path), image in zip(planned, images):
        mask = predict_probs(model, image, size or None, args.device, scales, flip) > args.threshold  # model.predict
        _write_png((mask * 255).astype(np.uint8), mask_path)
        _write_png((overlay(image, mask) * 255).round().astype(np.uint8), overlay_path)
        print(f"{path}: {image.shape[1]}x{image.shape[0]}, foreground {mask.mean():.1%} -> {mask_path}, "
              f"{overlay_path}")
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
    from .finite import TrainingDiverged
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, (ValueError, OSError, TrainingDiverged)) else f"{type(e).__name__}: {text}"


def _on_sigterm(signum, frame):
    from .runfolder import Interrupted
    raise Interrupted("terminated (SIGTERM)", EXIT_SIGTERM, "SIGTERM")


def _stderr(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null once its reader has gone, so that flushing stdout at exit cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def main(argv=None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    from .finite import TrainingDiverged
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = argv[0] if argv else None
    # SIGTERM (timeout, job schedulers) ends a command as Ctrl-C does: files being written are cleaned up; training
    # installs its own handlers, which stop at the next step and save
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
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
    except KeyboardInterrupt as e:
        code = getattr(e, "exit_code", EXIT_INTERRUPTED)
        if code == EXIT_SIGPIPE:
            _silence_stdout()
        _stderr(f"minideeplab {command}: interrupted ({getattr(e, 'reason', 'Ctrl-C')})")
        return code
    except BrokenPipeError:
        _silence_stdout()
        _stderr(f"minideeplab {command}: output closed (broken pipe)")
        return EXIT_SIGPIPE
    except Exception as e:
        if os.environ.get("MINIDEEPLAB_DEBUG"):
            raise
        _stderr(f"minideeplab {command}: error: {_one_line(e)}")
        return EXIT_DIVERGED if isinstance(e, TrainingDiverged) else EXIT_ERROR
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
