"""Averaging weights and predictions: uniform and greedy model soups (Wortsman et al. 2022) beside the ensemble
and the best single model, all ranked on the validation split."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cnnapps.engine.config import to_dict
from cnnapps.engine.runinfo import results_dir as _results_dir
from cnnapps.engine.runinfo import run_facts
from cnnapps.engine.trainer import MeanOfModels, evaluate_model, load_for_evaluation
from cnnapps.engine.task import Task, TaskConfig

log = logging.getLogger(__name__)


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors; integer buffers (BN's step counters) come from the first."""
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise ValueError("soup ingredients have different parameter names: they are not the same model")
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype)
            if states[0][k].is_floating_point() else states[0][k].clone() for k in keys}


def _with_state(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    template.load_state_dict(state)
    return template


def soup_report(task: Task, paths: Sequence[str | os.PathLike], data_root: str | os.PathLike,
                greedy: bool = True, monitor: str | None = None) -> dict:
    """Evaluate each checkpoint, their ensemble, the uniform soup and (optionally) the greedy soup on the
    validation and test splits. Returns a JSON-ready record with one row per candidate."""
    models, cfgs, data = load_for_evaluation(task, paths, data_root, split="test")
    cfg = cfgs[0]
    monitor = monitor or cfg.train.monitor or task.monitor
    sign = 1.0 if task.monitor_mode == "max" else -1.0
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    scratch = _clone(task, cfg, data, states[0], models[0])  # soups are evaluated by loading into this one

    def score(model: nn.Module) -> tuple[float, float, dict]:
        val, _ = evaluate_model(task, model, cfg, data, "val")
        test, _ = evaluate_model(task, model, cfg, data, "test")
        return val[monitor], test[monitor], test

    rows = []
    for p, m in zip(paths, models):
        v, t, _ = score(m)
        rows.append({"candidate": f"single: {Path(p).parent.parent.name}/{Path(p).name}", "val": v, "test": t})
    singles = list(rows)
    best = max(singles, key=lambda r: sign * r["val"])
    v, t, _ = score(MeanOfModels(models))
    rows.append({"candidate": f"ensemble of {len(paths)} (mean logits)", "val": v, "test": t})
    v, t, _ = score(_with_state(scratch, average_state_dicts(states)))
    rows.append({"candidate": f"uniform soup of {len(paths)}", "val": v, "test": t})
    if greedy:
        order = sorted(range(len(states)), key=lambda i: -sign * singles[i]["val"])
        chosen = [order[0]]
        current = singles[order[0]]["val"]
        for i in order[1:]:
            trial = _with_state(scratch, average_state_dicts([states[j] for j in chosen + [i]]))
            val, _ = evaluate_model(task, trial, cfg, data, "val")
            if sign * val[monitor] >= sign * current:
                chosen.append(i)
                current = val[monitor]
        v, t, _ = score(_with_state(scratch, average_state_dicts([states[j] for j in chosen])))
        rows.append({"candidate": f"greedy soup of {len(chosen)} ({', '.join(str(j) for j in chosen)})",
                     "val": v, "test": t})
    return {"task": task.name, "monitor": monitor, "checkpoints": [str(p) for p in paths],
            "best_single": best["candidate"], "rows": rows, "differences": config_differences(cfgs),
            **run_facts(next(scratch.parameters()).device)}


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def config_differences(cfgs: Sequence[TaskConfig]) -> dict[str, list]:
    """The config keys whose values differ between the checkpoints' configs (the recipe of each ingredient),
    key -> one value per checkpoint; a soup report shows them so that a reader knows what was varied."""
    flats = [_flat(to_dict(c)) for c in cfgs]
    keys = sorted(set().union(*flats))
    return {k: [f.get(k) for f in flats] for k in keys if len({json.dumps(f.get(k)) for f in flats}) > 1}


def _clone(task: Task, cfg, data, state: dict, like: nn.Module) -> nn.Module:
    model = task.build_model(cfg, data)
    model.load_state_dict(state)
    return model.to(next(like.parameters()).device).eval()


def write_soup_report(record: dict, results_dir: Path | None = None, name: str = "soup") -> Path:
    """results/<name>.md and .json from a ``soup_report`` record; returns the Markdown path."""
    results_dir = _results_dir(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    m = record["monitor"]
    lines = [f"# Model soups on task `{record['task']}`", "",
             "Written by `python -m cnnapps soup` - do not edit by hand. Candidates are ranked on the validation "
             "split; the test column is reported, never used for choosing.", "",
             f"machine: {record['machine']}; commit: {record['commit']}; time: {record['time_utc']}; "
             f"load at start: {record.get('load_at_start', 'not recorded')}", "",
             f"| candidate | val {m} | test {m} |", "| --- | --- | --- |"]
    lines += [f"| {r['candidate']} | {r['val']:.4f} | {r['test']:.4f} |" for r in record["rows"]]
    lines += ["", f"Best single model on validation: {record['best_single']}.", "", "Checkpoints:", ""]
    lines += [f"- {i}: `{c}`" for i, c in enumerate(record["checkpoints"])]
    diffs = record.get("differences") or {}
    if diffs:
        lines += ["", "How the ingredients differ (config keys with more than one value; everything else is shared):",
                  "", "| checkpoint | " + " | ".join(f"`{k}`" for k in diffs) + " |",
                  "| --- | " + " | ".join("---" for _ in diffs) + " |"]
        lines += [f"| {i} | " + " | ".join(str(v[i]) for v in diffs.values()) + " |"
                  for i in range(len(record["checkpoints"]))]
    path = results_dir / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path
