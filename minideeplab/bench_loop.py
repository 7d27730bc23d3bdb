"""``minideeplab bench --loop``: the training loop end to end, ``Trainer`` against a PyTorch loop, in images per second.

    minideeplab bench --loop                        # CPU, OS 16, batch 2x3x256x256, 200 steps each side
    minideeplab bench --loop --device cuda          # our steps replay a CUDA graph (Trainer's default on a GPU)
    minideeplab bench --loop --quick                # the small model at 64x64, 20 steps: a smoke run
    minideeplab bench --loop --loop-model small --loop-steps 50     # the small model at 256x256

What one step of a training run costs, everything included: loading and augmenting the batch (``SyntheticShapes``
with the trainer's augmentation, ``DataLoader`` with its prefetching thread), the upload to the device, the step
(forward, BCE loss, backward, AdamW update, poly schedule with warm-up), and the metrics a progress bar shows (the
loss and the confusion counts, read once per step). Ours is ``Trainer.fit`` as ``minideeplab train`` runs it (one
epoch of ``--loop-steps`` steps and one validation batch, no files written). PyTorch's is the loop a PyTorch user
writes for the same model (``torch_oracle.to_torch``: same architecture and initial weights), data (the same loader,
same batches), optimizer and schedule (``torch.optim.AdamW``, ``LambdaLR`` following our schedule's ``lr_at``),
reading ``loss.item()`` and the counts once per step. Each side runs in a fresh subprocess; images per second are
counted from the end of step ``--loop-warmup`` (ours: the warm-up steps and the capture come before) to the end of
the last step. The data pipeline alone (the loader without prefetching, one thread) is timed too: when it is
slower than a step, both loops wait for data, whatever the step costs. The process CPU time per image over the
timed steps (all threads: the step's, the prefetching thread's, and threads that spin while they wait) is the figure
that other processes on a shared machine disturb least.
"""
from __future__ import annotations

import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np

RESULT_FIELDS = ("images_per_s", "step_s", "data_images_per_s")


def loop_config(spec: dict):
    """The ``TrainConfig`` of the benchmark's run: ``spec``'s model, output stride, size, batch, device and steps."""
    from .train import TrainConfig
    steps = spec["loop_steps"]
    return TrainConfig(data="shapes", model=spec.get("model", "densenet121"), output_stride=spec["output_stride"],
                       image_size=spec["size"], batch_size=spec["batch"], epochs=1, train_size=spec["batch"] * steps,
                       val_size=spec["batch"], lr=2e-3, optimizer="adamw", weight_decay=1e-4, scheduler="poly",
                       warmup_steps=10, loss="bce", device=spec["device"], seed=0,
                       cuda_graph=spec.get("cuda_graph", True))


def _stamp() -> tuple:
    """(wall, process CPU) seconds at the end of a step."""
    return time.perf_counter(), time.process_time()


def _images_per_s(stamps: list, batch: int, warmup: int) -> dict:
    """Throughput from the end of step ``warmup`` to the end of the last step, the median step time there, and the
    process CPU seconds per image (``stamps``: ``_stamp()`` at the end of each step)."""
    timed = stamps[warmup - 1:] if warmup > 0 else stamps
    wall = [w for w, _ in timed]
    gaps = np.diff(wall).tolist()
    images = batch * len(gaps)
    return {"images_per_s": images / (wall[-1] - wall[0]) if gaps else None,
            "step_s": statistics.median(gaps) if gaps else None, "steps_timed": len(gaps), "steps_s": gaps,
            "cpu_s_per_image": (timed[-1][1] - timed[0][1]) / images if gaps else None}


def data_throughput(cfg, batches: int) -> float:
    """Images per second of the training loader alone, without prefetching (one thread)."""
    from .data import DataLoader
    from .train import build_datasets
    train_set, _ = build_datasets(cfg, np.random.default_rng(1))
    loader = DataLoader(train_set, cfg.batch_size, shuffle=True, rng=np.random.default_rng(2), drop_last=True)
    it = iter(loader)
    next(it)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(it, None)
        if batch is None:
            break
        n += len(batch[0])
    return n / (time.perf_counter() - start) if n else None


def run_ours(spec: dict) -> dict:
    from .train import Trainer
    cfg = loop_config(spec)
    trainer = Trainer(cfg, progress=False, figures=False)
    stamps = []
    trainer.on_step_end = lambda t: stamps.append(_stamp())     # after the step's read (a sync on a GPU)
    trainer.fit()
    result = _images_per_s(stamps, cfg.batch_size, spec["loop_warmup"])
    result["captured"] = bool(trainer.captured is not None and trainer.captured.captured)
    result["data_images_per_s"] = data_throughput(cfg, min(spec["loop_steps"], 20))
    return result


def run_torch(spec: dict) -> dict:
    import torch

    from .data import DataLoader
    from .models import build_deeplab
    from .optim import build_scheduler
    from .torch_oracle import to_torch
    from .train import build_datasets
    torch.set_num_threads(spec["threads"])
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = "cuda" if spec["device"] == "cuda" else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        return {"skipped": f"torch {torch.__version__} has no CUDA support here: PyTorch loop skipped"}
    cfg = loop_config(spec)
    init_seq, *seqs = np.random.SeedSequence(cfg.seed).spawn(4)         # as Trainer: same weights, same batches
    shuffle_rng, augment_rng, _ = (np.random.default_rng(s) for s in seqs)
    tmodel = to_torch(build_deeplab(cfg.model_config(), rng=np.random.default_rng(init_seq))).to(dev).train()
    train_set, _ = build_datasets(cfg, augment_rng)
    loader = DataLoader(train_set, cfg.batch_size, shuffle=True, rng=shuffle_rng, drop_last=True, prefetch=True)
    opt = torch.optim.AdamW(tmodel.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = len(loader)
    schedule = build_scheduler(cfg.scheduler, SimpleNamespace(lr=cfg.lr), total, min(cfg.warmup_steps, total - 1))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: schedule.lr_at(t) / cfg.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    stamps, losses = [], []
    for images, masks in loader:
        x, t = torch.from_numpy(images).to(dev), torch.from_numpy(masks).to(dev)
        opt.zero_grad(set_to_none=True)
        logits = tmodel(x)
        loss = loss_fn(logits, t)
        loss.backward()
        opt.step()
        lr_sched.step()
        with torch.no_grad():
            predicted, true = torch.sigmoid(logits) > cfg.threshold, t == 1
            counts = torch.stack([(predicted & true).sum(), predicted.sum(), true.sum()]).to(loss.dtype)
            values = torch.cat([loss.detach().reshape(1), counts]).tolist()      # the step's one read
        losses.append(values[0])
        stamps.append(_stamp())
    result = _images_per_s(stamps, cfg.batch_size, spec["loop_warmup"])
    result.update(torch=torch.__version__, final_loss=losses[-1])
    if dev == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    return result


def run_loop_phase(spec: dict) -> dict:
    """One side of the loop benchmark (``spec["framework"]``: "ours" or "torch"), in this process."""
    return run_torch(spec) if spec["framework"] == "torch" else run_ours(spec)


def markdown(report: dict) -> str:
    a = report["args"]
    where = report["machine"].get("gpu", "GPU") if a["device"] == "cuda" else f"{a['threads']} threads"
    ours = "Trainer, steps replayed as a CUDA graph" if a["device"] == "cuda" and a["cuda_graph"] else "Trainer"
    lines = [f"### Training loop, {a['model']}, batch {a['batch']}x3x{a['size']}x{a['size']}, {a['device']}, {where}: "
             f"images/s over {a['loop_steps']} steps after {a['loop_warmup']} ({ours}; PyTorch eager)", "",
             "| OS | ours (img/s) | PyTorch (img/s) | speed-up (ours / PyTorch) | ours step (ms) | PyTorch step (ms) "
             "| ours CPU (s/img) | PyTorch CPU (s/img) | data alone (img/s) |", "|---|---|---|---|---|---|---|---|---|"]

    def fmt(v, f):
        return "-" if v is None else f.format(v)
    for r in report["rows"]:
        o, t = r["ours"], r["torch"]
        lines.append(f"| {r['output_stride']} | {fmt(o.get('images_per_s'), '{:.2f}')} | "
                     f"{fmt(t.get('images_per_s'), '{:.2f}')} | {fmt(r['speedup'], '{:.2f}')} | "
                     f"{fmt(o.get('step_s') and 1e3 * o['step_s'], '{:.1f}')} | "
                     f"{fmt(t.get('step_s') and 1e3 * t['step_s'], '{:.1f}')} | "
                     f"{fmt(o.get('cpu_s_per_image'), '{:.3f}')} | {fmt(t.get('cpu_s_per_image'), '{:.3f}')} | "
                     f"{fmt(o.get('data_images_per_s'), '{:.1f}')} |")
    return "\n".join(lines) + "\n"


def main_loop(args, with_torch: bool) -> int:
    """``minideeplab bench --loop``: each output stride's two loops in fresh subprocesses; a JSON and a Markdown file."""

    from .bench import _fmt, machine_info, spawn_phase, write_report
    oss = args.output_strides or [16]
    size = args.size or (64 if args.quick else 256)
    steps = args.loop_steps or (20 if args.quick else 200)
    warmup = min(args.loop_warmup if args.loop_warmup is not None else (3 if args.quick else 10), steps - 1)
    base = {"device": args.device, "batch": args.batch, "size": size, "threads": args.threads, "mode": "loop",
            "model": args.loop_model or ("small" if args.quick else "densenet121"), "loop_steps": steps,
            "loop_warmup": warmup,
            "cuda_graph": True}
    report = {"args": dict(base, quick=args.quick), "machine": machine_info(), "rows": []}
    print(f"minideeplab bench --loop: {args.device}, {base['model']}, batch {args.batch}x3x{size}x{size}, "
          f"{steps} steps (timed after {warmup})" + ("" if with_torch else " (torch not installed: ours only)"),
          flush=True)
    for os_ in oss:
        spec = dict(base, output_stride=os_)
        ours = spawn_phase(dict(spec, framework="ours"), args.phase_timeout)
        theirs = spawn_phase(dict(spec, framework="torch"), args.phase_timeout) if with_torch else {}
        for r in (ours, theirs):
            if "error" in r or "skipped" in r:
                print("  " + r.get("error", r.get("skipped")), file=sys.stderr)
        speedup = (ours["images_per_s"] / theirs["images_per_s"]
                   if ours.get("images_per_s") and theirs.get("images_per_s") else None)
        report["rows"].append({"output_stride": os_, "ours": ours, "torch": theirs, "speedup": speedup})
        if "gpu" in theirs:
            report["machine"]["gpu"] = theirs["gpu"]
        print(f"  OS {os_:2d} loop  ours {_fmt(ours.get('images_per_s'), '{:.2f}')} img/s  torch "
              f"{_fmt(theirs.get('images_per_s'), '{:.2f}')} img/s  speed-up {_fmt(speedup, '{:.2f}')}  data alone "
              f"{_fmt(ours.get('data_images_per_s'), '{:.1f}')} img/s", flush=True)
    write_report(report, markdown(report), args.out, f"bench_loop_{args.device}" + ("_quick" if args.quick else ""))
    failed = [r for r in report["rows"] if "error" in r["ours"] or "error" in r["torch"]]
    return 1 if failed else 0
