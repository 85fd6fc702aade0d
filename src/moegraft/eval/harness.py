"""EleutherAI's lm-eval harness on an already loaded model, through its Hugging Face backend (HFLM).

In: a model, its tokenizer, task names or local task YAML files. Out: task → metric → value.
Optional: needs `pip install moegraft[eval]` (the `lm_eval` package).
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from moegraft.errors import MoegraftError


class LmEvalError(MoegraftError):
    """lm-eval is missing, a task is unknown, or the harness failed."""


def _items(tasks: list[str] | str) -> list[str]:
    return [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]


def parse_tasks(tasks: list[str] | str) -> tuple[list[str], list[str]]:
    """(task names, include dirs): a `.yaml` entry contributes its `task:` name and its folder."""
    import yaml

    items = _items(tasks)
    names, include = [], []
    for t in items:
        if t.endswith((".yaml", ".yml")):
            p = Path(t).expanduser().resolve()
            if not p.is_file():
                raise LmEvalError(f"{t}: no such task YAML file")
            name = (yaml.safe_load(p.read_text()) or {}).get("task")
            if not isinstance(name, str):
                raise LmEvalError(f"{t}: the YAML has no `task:` name")
            names.append(name)
            if str(p.parent) not in include:
                include.append(str(p.parent))
        else:
            names.append(t)
    if not names:
        raise LmEvalError("--lm-eval got no task names")
    return names, include


def run_lm_eval(
    model: nn.Module,
    tokenizer,
    tasks: list[str] | str,
    *,
    limit: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on `model` in process (no reload, no hub access beyond what the tasks need).

    Args:
        model: a loaded transformers causal LM.
        tokenizer: its tokenizer.
        tasks: registered lm-eval task names and/or paths to local task YAML files.
        limit: at most this many documents per task.

    Returns:
        task → metric → value (numeric metrics only; "acc,none" becomes "acc").
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LmEvalError("--lm-eval needs the lm-eval harness: pip install 'moegraft[eval]'") from None
    names, include = parse_tasks(tasks)
    # Indexing lm-eval's thousands of built-in tasks takes ~15 s: skip it when every task is a local YAML.
    only_local = len(include) > 0 and all(t.endswith((".yaml", ".yml")) for t in _items(tasks))
    tm = TaskManager(include_path=include or None, include_defaults=not only_local)
    unknown = [n for n in names if not tm.match_tasks([n])]
    if unknown:
        raise LmEvalError(f"unknown lm-eval task(s) {unknown}; pass a registered name or a local task .yaml")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        out = simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=tm,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=False,
            bootstrap_iters=0,
        )
    except Exception as e:  # dataset download refused offline, malformed task, ...
        raise LmEvalError(
            f"lm-eval failed on {names}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        for key, v in metrics.items():
            if (
                key in ("alias", "sample_len")
                or "_stderr" in key
                or not isinstance(v, (int, float))
                or isinstance(v, bool)
            ):
                continue
            if isinstance(v, float) and math.isnan(v):
                continue
            scores.setdefault(task, {})[key.split(",")[0]] = float(v)
    return scores
