"""The methods a conversion runs, as objects (the way kvpress composes presses): `CommonKV`, `KVSharer`, and
`Combination`, KVSharer's sharers with CommonKV latents over the rest. Each has

- `analyze(source, facts, data, work, reporter, devices)`: every forward pass and fit it needs → Analysis;
- `plan(analysis)`: the budget stage for its own budget fields (sweeps re-plan one analysis);
- `skipped(analysis)` / `tensors(source, analysis)`: the source tensors the checkpoint leaves out and the ones it
  adds; whatever computing they need runs in `tensors`, before the writer opens.

`method_for` builds the method of a ConvertOptions from its fields of the same names; `analyze_source` runs it on
a source model's calibration data.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .analysis import Analysis, CalibrationData
from .architectures import ArchFacts, resolve
from .calibrate import resolve_devices
from .checkpoint.reader import SourceModel
from .commonkv import CommonKV
from .errors import PlanError, UserInputError
from .kvsharer import KVSharer
from .progress import Reporter
from .recipe import ConvertOptions
from .resume import WorkDir
from .resume import fingerprint as resume_fingerprint


@dataclass(frozen=True)
class Combination:
    """KVSharer's search first (its sharers store nothing), then CommonKV over the layers that store, planned
    so that the whole model reaches CommonKV's ratio."""

    sharer: KVSharer
    latent: CommonKV

    def analyze(self, source: SourceModel, facts: ArchFacts, data: CalibrationData, work: WorkDir,
                reporter: Reporter, devices: list[torch.device], *, keep_tokens: int = 0) -> Analysis:
        sharing = self.sharer.search(source, facts, data, reporter)
        return self.latent.analyze(source, facts, data, work, reporter, devices, keep_tokens=keep_tokens,
                                   sharing=sharing)

    def plan(self, analysis: Analysis) -> Analysis:
        return self.latent.plan(analysis)

    def skipped(self, analysis: Analysis) -> set[str]:
        return self.latent.skipped(analysis) | self.sharer.skipped(analysis)

    def tensors(self, source: SourceModel, analysis: Analysis,
                reporter: Reporter | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        refit = self.sharer.tensors(source, analysis, reporter)  # computed now: the writer only writes
        return itertools.chain(self.latent.tensors(source, analysis), refit)

    def group_entry(self, opt, analysis: Analysis) -> dict:
        return self.latent.group_entry(opt, analysis)


Method = CommonKV | KVSharer | Combination


def method_for(options: ConvertOptions) -> Method:
    """The method `options.method` names, with its hyperparameters taken from `options`."""
    def build(cls):
        return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(cls)})

    if options.method == "kvsharer":
        return build(KVSharer)
    if options.method == "commonkv+kvsharer":
        return Combination(build(KVSharer), build(CommonKV))
    return build(CommonKV)


def analyze_source(source: SourceModel, options: ConvertOptions, reporter: Reporter,
                   keep_tokens: int = 0, work: WorkDir | None = None) -> Analysis:
    """Tokenize the calibration data and run the options' method on it. With a persistent `work` directory
    every finished layer is recorded there, and a rerun with the same inputs continues after the last one."""
    facts = resolve(source.config)
    tokenizer = source.tokenizer()
    data = CalibrationData.load(options.calib, tokenizer, options.samples, options.seq_len, options.held_out)
    del tokenizer  # ~150 MB for a large vocabulary; nothing later needs it
    work = work or WorkDir.for_output(None)
    work.bind(resume_fingerprint(options.to_dict() | {"keep_tokens": keep_tokens}, source.path,
                                 sorted(set(source.weight_map.values())), source.config, data.info["sha256"]),
              reporter.log)
    try:
        return method_for(options).analyze(source, facts, data, work, reporter, resolve_devices(options.device),
                                           keep_tokens=keep_tokens)
    except (UserInputError, PlanError):  # bad input fails the same way on every rerun: nothing worth resuming
        work.close(remove=True)
        raise
