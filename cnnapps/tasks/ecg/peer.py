"""A peer on the same work: torch_ecg's ``ECG_CRNN`` (what an ECG user might pick instead of this project) trained on
exactly our CinC 2017 split and training windows, for a fixed training time on the same machine, and scored by our
metric code (``ECGMetrics``: record-level challenge F1 from the mean probability).

torch_ecg is an optional benchmark extra (``pip install 'cnnapps[bench]'``, installed without its torch pin), never a
runtime dependency: this module imports it only when a peer is built.

Usage: ``python -m cnnapps.tasks.ecg.peer --peer cpu --seconds 900`` writes the run as a section of results/ecg.md
and results/ecg.json (``--results`` elsewhere). ``--max-steps`` (tuning runs) stops after a number of optimiser
steps instead of the clock.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from cnnapps.engine.config import ConfigError, load_config, to_dict
from cnnapps.tasks.ecg.data import IGNORE, collate_windows
from cnnapps.tasks.ecg.metrics import ECGMetrics

log = logging.getLogger(__name__)

# The peers: torch_ecg's own ECG_CRNN default (a bottleneck ResNet with squeeze-and-excitation, a 1024-unit
# classifier: 9.5 M parameters), and a CPU-sized config of the same family (its plain ``resnet_nature_comm``
# with fewer filters and a smaller classifier: about 1 M parameters, the size of our default network).
PEERS: dict[str, dict[str, Any]] = {
    "default": {"about": "torch_ecg ECG_CRNN_CONFIG as shipped: resnet_nature_comm_bottle_neck CNN, SE attention, "
                         "max pooling, 1024-unit mish classifier"},
    "cpu": {"about": "torch_ecg resnet_nature_comm (basic blocks), stem 32 and 48/64/96/128 filters, SE attention, "
                     "max pooling, 128-unit classifier",
            "cnn": "resnet_nature_comm", "stem_filters": 32, "num_filters": [48, 64, 96, 128], "clf": [128]},
}


@dataclass
class PeerRecipe:
    """How a peer is trained: AdamW at ``lr`` with a one-cycle schedule laid over the time budget (linear warm-up
    over ``warmup`` of it from lr / 25, then cosine to zero), batches of ``batch_size`` training windows,
    cross-entropy on the record label with our loss weights, gradients clipped at ``grad_clip``."""

    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 32
    warmup: float = 0.3
    grad_clip: float = 1.0


def _torch_ecg() -> Any:
    try:
        import torch_ecg  # noqa: F401
        from torch_ecg.model_configs import ECG_CRNN_CONFIG
        from torch_ecg.models import ECG_CRNN
    except ImportError as exc:
        raise ConfigError(f"the torch_ecg peer needs torch_ecg and its runtime dependencies (pip install "
                          f"'cnnapps[bench]'): {exc}") from None
    return ECG_CRNN, ECG_CRNN_CONFIG


def build_peer(name: str, classes: list[str], in_chans: int = 1) -> tuple[nn.Module, dict[str, Any]]:
    """torch_ecg's ECG_CRNN as peer ``name`` (a key of PEERS) for ``classes``: (model mapping (batch, leads, time)
    to logits (batch, classes), a description of what was built)."""
    if name not in PEERS:
        raise ConfigError(f"--peer {name!r}: choose one of {', '.join(PEERS)}")
    ECG_CRNN, base = _torch_ecg()
    spec = PEERS[name]
    cfg = deepcopy(base)
    if "cnn" in spec:
        cfg.cnn.name = spec["cnn"]
        cfg.cnn[spec["cnn"]].stem.num_filters = spec["stem_filters"]
        cfg.cnn[spec["cnn"]].num_filters = list(spec["num_filters"])
        cfg.clf.out_channels = list(spec["clf"])
    cnn = cfg.cnn[cfg.cnn.name]
    model = ECG_CRNN(classes=list(classes), n_leads=in_chans, config=cfg)
    import torch_ecg

    info = {"package": f"torch_ecg {getattr(torch_ecg, '__version__', '?')}", "model": "ECG_CRNN", "peer": name,
            "about": spec["about"], "cnn": cfg.cnn.name, "stem_filters": int(cnn.stem.num_filters),
            "num_filters": [int(v) for v in cnn.num_filters], "attention": str(cfg.attn.name),
            "rnn": str(cfg.rnn.name), "global_pool": str(cfg.global_pool),
            "classifier": [int(v) for v in cfg.clf.out_channels],
            "parameters": int(sum(p.numel() for p in model.parameters()))}
    return model, info


def _record_targets(y: torch.Tensor) -> torch.Tensor:
    """The record label of each window (its labelled steps all carry it; padding is -100): (batch,)."""
    return y.max(dim=1).values


def evaluate_peer(model: nn.Module, dataset: Any, classes: list[str], batch_size: int = 32) -> dict[str, float]:
    """Our metric on a peer's record logits: each window's logits are repeated over its 256-sample steps, so the
    record label from the mean probability is the peer's own prediction. Returns ECGMetrics.compute()."""
    metric = ECGMetrics(classes, target="record")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_windows)
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            logits = model(batch["x"]).float()
            metric.update(logits[:, :, None].expand(-1, -1, batch["y"].shape[1]), batch)
    return metric.compute()


def train_peer(peer: str, data_root: Path, seconds: float, recipe: PeerRecipe, seed: int = 0, threads: int = 0,
               max_steps: int = 0, config: str | None = None) -> dict[str, Any]:
    """Train peer ``peer`` on our default config's split and windows (or those of ``config``) for ``seconds`` of
    training (validation passes excluded, as in our engine) or ``max_steps`` optimiser steps; validate at each
    epoch end and at the end, keep the weights with the best validation challenge F1, score them on the test
    split. Returns the facts and metrics of the run."""
    from cnnapps.tasks.ecg.task import ECGConfig, ECGTask

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    task = ECGTask()
    cfg = load_config(ECGConfig, config, search=task.config_dir())
    data = task.build_data(cfg, data_root)
    classes = list(data.state["classes"])
    model, info = build_peer(peer, classes, int(data.state.get("in_chans", 1)))
    weights = torch.tensor(data.state["class_weights"], dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    g = torch.Generator().manual_seed(seed)
    budget = float(seconds) if not max_steps else math.inf

    def lr_at(fraction: float) -> float:
        if fraction < recipe.warmup:
            return recipe.lr * (1 / 25 + (1 - 1 / 25) * fraction / recipe.warmup)
        t = (fraction - recipe.warmup) / max(1e-9, 1 - recipe.warmup)
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    trained, steps, epoch, seen = 0.0, 0, 0, 0
    best: tuple[float, dict] | None = None
    history = []
    done = False
    while not done:
        epoch += 1
        loader = DataLoader(data.train, batch_size=recipe.batch_size, sampler=RandomSampler(data.train, generator=g),
                            collate_fn=collate_windows, drop_last=False)
        model.train()
        t0 = time.perf_counter()
        for batch in loader:
            fraction = (trained + time.perf_counter() - t0) / budget if max_steps == 0 else steps / max_steps
            for group in opt.param_groups:
                group["lr"] = lr_at(fraction)
            target = _record_targets(batch["y"])
            keep = target != IGNORE
            logits = model(batch["x"])
            loss = F.cross_entropy(logits[keep], target[keep], weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            steps += 1
            seen += len(target)
            if steps % 20 == 0:
                log.info("peer %s: step %d, loss %.4f, %.0f s trained", peer, steps, loss.item(),
                         trained + time.perf_counter() - t0)
            if (max_steps and steps >= max_steps) or trained + time.perf_counter() - t0 >= budget:
                done = True
                break
        trained += time.perf_counter() - t0
        val = evaluate_peer(model, data.val, classes)
        history.append({"epoch": epoch, "steps": steps, "trained_seconds": round(trained, 2),
                        "val_challenge_f1": val["challenge_f1"]})
        log.info("peer %s: epoch %d (%d steps, %.0f s): val challenge_f1 %.4f", peer, epoch, steps, trained,
                 val["challenge_f1"])
        if best is None or val["challenge_f1"] > best[0]:
            best = (val["challenge_f1"], deepcopy(model.state_dict()))
    assert best is not None
    model.load_state_dict(best[1])
    test = evaluate_peer(model, data.test, classes)
    per_epoch = len(data.train) / recipe.batch_size
    return {"info": info, "recipe": asdict(recipe), "test": test, "train_seconds": round(trained, 2),
            "steps": steps, "epochs": round(steps / per_epoch, 3), "samples_per_s": round(seen / max(trained, 1e-9), 2),
            "history": history, "best_val_challenge_f1": best[0], "config": cfg, "data": data}


def probe_peer(peer: str, data_root: Path, steps: int, recipe: PeerRecipe, seed: int = 0, threads: int = 0,
               budget: float = 900.0) -> dict[str, Any]:
    """Time ``steps`` training steps of peer ``peer`` on our training windows (the first one, warm-up, untimed)
    and project one epoch: for a peer too slow to train in the budget. Returns a results-file record whose
    notes say how long an epoch would take against ``budget``."""
    from cnnapps.engine.runinfo import load_average, run_facts
    from cnnapps.tasks.ecg.task import ECGConfig, ECGTask

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = ECGConfig()
    data = ECGTask().build_data(cfg, data_root)
    classes = list(data.state["classes"])
    model, info = build_peer(peer, classes, int(data.state.get("in_chans", 1)))
    weights = torch.tensor(data.state["class_weights"], dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    loader = DataLoader(data.train, batch_size=recipe.batch_size, collate_fn=collate_windows,
                        sampler=RandomSampler(data.train, generator=torch.Generator().manual_seed(seed)))
    model.train()
    times = []
    for i, batch in enumerate(loader):
        t0 = time.perf_counter()
        target = _record_targets(batch["y"])
        loss = F.cross_entropy(model(batch["x"]), target, weight=weights, ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        times.append(time.perf_counter() - t0)
        if i >= steps:
            break
    per_step = float(np.median(times[1:]))
    steps_per_epoch = math.ceil(len(data.train) / recipe.batch_size)
    epoch_s = per_step * steps_per_epoch
    notes = [f"**Peer**: {info['package']} `{info['model']}`, {info['about']}; {info['parameters'] / 1e6:.2f} M "
             f"parameters ({info['parameters']:,}).",
             f"**Timed, not trained**: a training step on {recipe.batch_size} of our windows takes {per_step:.2f} s on "
             f"this machine (median of {len(times) - 1} steps), so one epoch ({steps_per_epoch} steps) would take "
             f"{epoch_s:.0f} s, {epoch_s / budget:.1f} times the {budget:.0f} s training budget"
             + (": it cannot finish one epoch in it. The CPU-sized config of the same family (`torch_ecg_cpu`) is the "
                "comparison." if epoch_s > budget else ".")]
    return {"task": "ecg", "config": f"torch_ecg_{peer}", "key": f"torch_ecg_{peer}",
            "overrides": [f"--probe-steps {steps}"], **run_facts("cpu"), "load_at_end": load_average(),
            "train_seconds": round(sum(times), 2), "epochs": round(len(times) / steps_per_epoch, 3),
            "train_samples_per_s": round(recipe.batch_size / per_step, 2), "monitor": "challenge_f1",
            "test": {"seconds_per_step": round(per_step, 3), "projected_epoch_seconds": round(epoch_s, 1)},
            "extra": {}, "report": {"notes": notes, "peer": info},
            "resolved_config": {"peer": dict(info), "recipe": asdict(recipe), "data": to_dict(cfg)["data"]}}


def peer_record(result: dict[str, Any], seconds: float, max_steps: int) -> dict[str, Any]:
    """The results-file record of a peer run (a section of results/ecg.md beside our configs)."""
    from cnnapps.engine.runinfo import load_average, run_facts

    info, cfg = result["info"], result["config"]
    test = dict(result["test"])
    test["train_seconds"] = result["train_seconds"]
    whole = result["epochs"] >= 1
    notes = [f"**Peer**: {info['package']} `{info['model']}`, {info['about']}; {info['parameters'] / 1e6:.2f} M "
             f"parameters ({info['parameters']:,}). Trained on exactly our split and training windows (the "
             "`default` config's data section below), scored by our metric code.",
             f"**Budget**: {'at most ' + str(max_steps) + ' optimiser steps' if max_steps else f'{seconds:.0f} s of training'}"
             f"; it got through {result['steps']:,} steps of {result['recipe']['batch_size']} windows = "
             f"{result['epochs']:.2f} epochs" + ("" if whole else ", less than one epoch") + f" in "
             f"{result['train_seconds']:.0f} s. Weights kept: the best validation challenge F1 "
             f"({result['best_val_challenge_f1']:.4f}) among epoch ends and the end of the budget.",
             f"**Recipe**: AdamW lr {result['recipe']['lr']:g}, weight decay {result['recipe']['weight_decay']:g}, "
             f"one-cycle over the budget ({result['recipe']['warmup']:.0%} warm-up), gradient norm clip "
             f"{result['recipe']['grad_clip']:g}, cross-entropy on the record label with our loss weights."]
    if "challenge_f1_ci_low" in test:
        notes.append(f"**Challenge F1 {test['challenge_f1']:.3f}**, 95% bootstrap interval "
                     f"{test['challenge_f1_ci_low']:.3f} - {test['challenge_f1_ci_high']:.3f}.")
    return {"task": "ecg", "config": f"torch_ecg_{info['peer']}", "key": f"torch_ecg_{info['peer']}",
            "overrides": [f"--seconds {seconds:g}"] + ([f"--max-steps {max_steps}"] if max_steps else []),
            **run_facts("cpu"), "load_at_end": load_average(), "train_seconds": result["train_seconds"],
            "epochs": result["epochs"], "train_samples_per_s": result["samples_per_s"], "monitor": "challenge_f1",
            "test": test, "extra": {}, "report": {"notes": notes, "peer": info, "history": result["history"]},
            "resolved_config": {"peer": {k: v for k, v in info.items()}, "recipe": result["recipe"],
                                "data": to_dict(cfg)["data"]}}


def main(argv: list[str] | None = None) -> int:
    from cnnapps.bench.results import write_run
    from cnnapps.data.root import find_data_root
    from cnnapps.engine.runinfo import results_dir

    p = argparse.ArgumentParser(prog="python -m cnnapps.tasks.ecg.peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", default="cpu", choices=list(PEERS), help="which ECG_CRNN config (default: cpu)")
    p.add_argument("--seconds", type=float, default=900.0, help="training time budget in seconds (default 900)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimiser steps instead")
    p.add_argument("--probe-steps", type=int, default=0,
                   help="only time this many training steps and project an epoch (a peer too slow to train)")
    p.add_argument("--lr", type=float, default=PeerRecipe.lr, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=PeerRecipe.weight_decay, help="AdamW weight decay")
    p.add_argument("--batch-size", type=int, default=PeerRecipe.batch_size, help="windows per step")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and shuffling")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--data-dir", type=Path, default=None, help="data root (default: $CNNAPPS_DATA, ...)")
    p.add_argument("--results", type=Path, default=None, help="results folder (default: the checkout's results/)")
    p.add_argument("--no-write", action="store_true", help="print the test metrics, write no results file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        recipe = PeerRecipe(lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size)
        if args.probe_steps:
            record = probe_peer(args.peer, find_data_root(args.data_dir), args.probe_steps, recipe, seed=args.seed,
                                threads=args.threads, budget=args.seconds)
        else:
            result = train_peer(args.peer, find_data_root(args.data_dir), args.seconds, recipe, seed=args.seed,
                                threads=args.threads, max_steps=args.max_steps)
            record = peer_record(result, args.seconds, args.max_steps)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print({k: round(v, 4) for k, v in record["test"].items() if isinstance(v, float)})
    if not args.no_write:
        out = results_dir(args.results)
        out.mkdir(parents=True, exist_ok=True)
        print(write_run(record, out, "ecg"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
