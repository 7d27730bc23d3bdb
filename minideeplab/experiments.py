"""``minideeplab experiment NAME``: the design note's claims, measured over several seeds.

Each experiment trains the variants it compares with every seed (the same seed gives every variant the same
weights' initialisation draws, data and augmentation), evaluates them on the seed's validation set with IoU,
Boundary IoU and trimap IoU (``inference.evaluate_model``), and writes into ``--out``: ``results.csv`` (one row per
variant and seed), ``summary.md`` (mean ± std per variant, the per-seed differences from the baseline variant,
the command and the machine), ``metrics.png`` (bars with error bars), ``trimap.png`` (trimap IoU against the band
width) and ``predictions.png`` (the same validation images predicted by every variant, first seed). Variants that
differ only in how they are evaluated (``eval-stride``, ``test-time``) share one trained model per seed.

Experiments (docs/experiments.md has the design and the results):

- ``output-stride``: train at output stride 32, 16 and 8 on the fine-structure data; also seconds per training step
  and the peak memory of a step.
- ``eval-stride``: train at 16, evaluate at 16 and at 8 (same weights); train at 8 as the reference.
- ``aspp``: on the context data, 1×1 branch only / 1×1 + image pooling / ASPP without image pooling / with it / with
  rates too large for the feature map (every off-centre tap reads padding: the 3×3 branches become 1×1 convolutions).
- ``test-time``: single scale, flip, multi-scale (0.5-1.75), multi-scale + flip, all on one model per seed.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from .inference import PAPER_SCALES, evaluate_model, predict_proba
from .train import TrainConfig

DEFAULTS = dict(model="small", image_size=96, epochs=12, train_size=320, val_size=64, batch_size=8)
QUICK = dict(image_size=32, epochs=1, train_size=8, val_size=4, batch_size=4)   # the pipeline in seconds (tests)
FIGURE_IMAGES = 4


@dataclass
class ExperimentConfig(TrainConfig):
    """A ``TrainConfig`` with the ASPP ablations of ``DeepLabConfig`` (``rates``, ``image_pooling``)."""
    rates: tuple | None = None
    image_pooling: bool = True

    def model_config(self):
        config = super().model_config()
        config.rates = None if self.rates is None else tuple(int(r) for r in self.rates)
        config.image_pooling = bool(self.image_pooling)
        return config


@dataclass(frozen=True)
class Variant:
    """One arm of an experiment: ``train`` overrides the training config, ``evaluate`` sets ``evaluate_model``'s
    options (``output_stride``, ``scales``, ``flip``)."""
    name: str
    train: dict = field(default_factory=dict)
    evaluate: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    claim: str
    data: str
    variants: tuple          # of Variant, or a function (image_size, output_stride) -> tuple of Variant
    baseline: int = 0        # the variant the others are compared with (paired per-seed differences)
    settings: dict = field(default_factory=dict)      # overrides DEFAULTS (not --quick nor the command line)


def _aspp_variants(image_size: int, output_stride: int = 16) -> tuple:
    s = max(1, -(-image_size // output_stride))               # the feature map's side (conv0 and pool0 round up)
    fit = tuple(max(1, round(s * f)) for f in (1 / 6, 1 / 3, 1 / 2))
    large = (s, 2 * s, 3 * s)                                 # every off-centre tap falls outside the map
    return (Variant("1x1 only (no ASPP)", {"rates": (), "image_pooling": False}),
            Variant("1x1 + pooling", {"rates": ()}),
            Variant(f"ASPP {fit}, no pooling", {"rates": fit, "image_pooling": False}),
            Variant(f"ASPP {fit} + pooling", {"rates": fit}),
            Variant(f"ASPP {large} + pooling", {"rates": large}))


EXPERIMENTS = {e.name: e for e in (
    Experiment("output-stride", "Output stride 32 / 16 / 8",
               "a smaller output stride keeps resolution and segments thin structures and edges better, at a cost",
               "shapes-fine", tuple(Variant(f"OS {s}", {"output_stride": s}) for s in (32, 16, 8))),
    Experiment("eval-stride", "Train at output stride 16, evaluate at 8",
               "the weights trained at 16 evaluated at 8 (denser features, same weights) segment better, for free",
               "shapes-fine", (Variant("train 16, eval 16", {"output_stride": 16}),
                               Variant("train 16, eval 8", {"output_stride": 16}, {"output_stride": 8}),
                               Variant("train 8, eval 8", {"output_stride": 8}))),
    Experiment("aspp", "ASPP and image pooling on the context data",
               "image pooling gives every pixel the whole image's context; atrous rates larger than the feature "
               "map degenerate to 1x1 convolutions", "shapes-context", _aspp_variants, baseline=3,
               settings={"epochs": 16}),
    Experiment("test-time", "Multi-scale and flip inference",
               "averaging over input scales and mirror images improves the prediction of the same model",
               "shapes", (Variant("single scale"), Variant("flip", {}, {"flip": True}),
                          Variant("multi-scale", {}, {"scales": PAPER_SCALES}),
                          Variant("multi-scale + flip", {}, {"scales": PAPER_SCALES, "flip": True}))),
)}


def resolve_variants(exp: Experiment, settings: dict) -> tuple[tuple, str]:
    """The experiment's variants for these settings, and the name of its baseline."""
    variants = exp.variants
    if callable(variants):
        variants = variants(settings["image_size"], settings.get("output_stride", 16))
    return variants, variants[exp.baseline].name


def step_memory_mib(cfg: TrainConfig) -> float:
    """Peak memory of one training step's forward + backward on a fresh model (MiB): NumPy buffers traced by
    ``tracemalloc`` on the CPU (what the step allocates beyond the weights), the memory pool on a GPU."""
    import tracemalloc

    from .backend import get_array_module, to_device
    from .losses import build_loss
    from .models import build_deeplab
    model = build_deeplab(cfg.model_config(), rng=np.random.default_rng(0)).to(cfg.device).train()
    rng = np.random.default_rng(1)
    x = to_device(rng.standard_normal((cfg.batch_size, 3, cfg.image_size, cfg.image_size), np.float32), cfg.device)
    t = to_device((rng.random((cfg.batch_size, 1, cfg.image_size, cfg.image_size)) > 0.5).astype(np.float32),
                  cfg.device)
    loss = build_loss(cfg.loss)
    model(x)                                          # first call: caches, algorithm choices

    def step():
        loss(model(x), t)
        model.backward(loss.backward(), input_grad=False)
    if cfg.device == "cuda":       # the pool keeps freed blocks: its growth over a step is about the step's peak
        pool = get_array_module(x).get_default_memory_pool()
        pool.free_all_blocks()
        base = pool.total_bytes()
        step()
        return (pool.total_bytes() - base) / 2**20
    tracemalloc.start()
    try:
        step()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def run(exp: Experiment, settings: dict, seeds, out: Path, command: str, progress: bool = True, log=print) -> list:
    """Train and evaluate every variant with every seed; write the results (see the module docstring)."""
    from tqdm import tqdm

    from .experiment_report import write_report
    from .train import Trainer
    variants, baseline = resolve_variants(exp, settings)
    groups = {}                                          # one training per distinct training config
    for v in variants:
        groups.setdefault(tuple(sorted(v.train.items())), []).append(v)
    rows, figure, memory, loads = [], {}, {}, [load_average()]
    bar = tqdm(total=len(seeds) * len(groups), desc=exp.name, disable=not progress)
    started = time.perf_counter()
    with bar:
        for seed in seeds:
            for key, members in groups.items():
                cfg = ExperimentConfig(**{**settings, "data": settings.get("data") or exp.data, "seed": seed,
                                          **dict(key)})
                bar.set_postfix_str(f"seed {seed}: {', '.join(v.name for v in members)}")
                if key not in memory:
                    memory[key] = step_memory_mib(cfg)
                trainer = Trainer(cfg, out_dir=None, progress=False, figures=False)
                trainer.fit()
                s_per_step = sum(r["seconds"] for r in trainer.history) / max(trainer.global_step, 1)
                for v in members:
                    metrics = evaluate_model(trainer.model, trainer.val_loader, device=cfg.device, **v.evaluate)
                    rows.append({"experiment": exp.name, "variant": v.name, "seed": seed, **metrics,
                                 "train_s_per_step": s_per_step, "step_peak_mib": memory.get(key, float("nan"))})
                    if seed == seeds[0]:
                        figure[v.name] = _figure_predictions(trainer, v)
                bar.update()
                loads.append(load_average())
    elapsed = time.perf_counter() - started
    write_report(out, exp, variants, baseline, rows, figure, settings, seeds, command, elapsed, machine(),
                 load=describe_load(loads))
    if log:
        log(f"{exp.name}: {len(rows)} evaluations in {elapsed:.0f} s; wrote {out}/results.csv, summary.md, "
            "metrics.png, trimap.png, predictions.png")
    return rows


def _figure_predictions(trainer, variant: Variant):
    """(images, masks, probabilities) of the first validation images, predicted as ``variant`` evaluates."""
    from .backend import to_device, to_numpy
    from .models import set_output_stride
    images, masks = next(iter(trainer.val_loader))
    images, masks = images[:FIGURE_IMAGES], masks[:FIGURE_IMAGES]
    model, own = trainer.model, trainer.model.output_stride
    stride = variant.evaluate.get("output_stride", own)
    set_output_stride(model, stride)
    try:
        probs = predict_proba(model, to_device(images, trainer.cfg.device), variant.evaluate.get("scales", (1.0,)),
                              variant.evaluate.get("flip", False))
    finally:
        set_output_stride(model, own)
    return images, masks, to_numpy(probs)


def machine() -> str:
    import os
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return (f"{cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"NumPy {np.__version__}, {platform.system()}, OMP_NUM_THREADS={threads}")


def cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float:
    """The machine's 1-minute load average (nan where the system does not report one)."""
    import os
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return float("nan")


def describe_load(loads) -> str:
    """The load averages sampled at the start and after each training, in words: timings (seconds per step and
    per image) are comparable only between runs on an equally loaded machine."""
    import os
    a = np.array([x for x in loads if x == x])
    if not len(a):
        return "not reported by this system"
    return (f"1-minute load average {a.mean():.2f} on {os.cpu_count()} CPUs (min {a.min():.2f}, max {a.max():.2f}; "
            f"{len(a)} samples: at the start and after each training)")


def build_parser() -> argparse.ArgumentParser:
    from .cli import _Parser  # usage errors on one line, as every minideeplab command
    p = _Parser(prog="minideeplab experiment",
                description="Measure one of the design note's claims over several seeds.")
    p.add_argument("name", choices=sorted(EXPERIMENTS), help="the experiment")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...; default 3)")
    p.add_argument("--out", help="output folder (default runs/experiments/NAME)")
    p.add_argument("--model", choices=("small", "densenet121"), default="small")
    p.add_argument("--data", help="override the experiment's data ('shapes', 'shapes-fine', 'shapes-context', "
                                  "or a folder)")
    p.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds (checks the "
                                                        "pipeline; its numbers mean nothing)")
    for name in ("epochs", "image_size", "train_size", "val_size", "batch_size"):
        p.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {DEFAULTS[name]} (quick: {QUICK[name]})")
    p.add_argument("--lr", type=float)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    exp = EXPERIMENTS[args.name]
    known = {f.name for f in fields(TrainConfig)}
    settings = {**DEFAULTS, **exp.settings, **(QUICK if args.quick else {}), "model": args.model,
                "device": args.device}
    settings.update({k: v for k, v in vars(args).items() if k in known and v is not None and k != "model"})
    out = Path(args.out or Path("runs") / "experiments" / exp.name)
    command = "minideeplab experiment " + " ".join(sys.argv[2:] if argv is None else [str(a) for a in argv])
    run(exp, settings, list(range(args.seeds)), out, command, progress=not args.quiet)
    return 0


__all__ = ["DEFAULTS", "EXPERIMENTS", "QUICK", "Experiment", "ExperimentConfig", "Variant", "main", "run"]
