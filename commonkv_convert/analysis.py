"""What the methods measure before anything is written: the calibration data and the analysis result.

`Analysis` is the public result type of the analysis stage: `convert` writes from it, `commonkv analyze`
draws its maps from it, and sweeps re-plan it for other budgets without calibrating again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .architectures import ArchFacts
from .budget import FULL_BITS, Option, plan_bits, plan_cost
from .decode_cost import Shape
from .calibration_data import (
    DEFAULT_CALIBRATION,
    fingerprint,
    read_texts,
    token_sequences,
)
from .factorize import Candidate
from .kvsharer import SharingPlan
from .resume import CandidateStore


@dataclass(frozen=True)
class CalibrationData:
    """Calibration sequences [N, T]: the last `held_out` are the held-out split that errors are measured on,
    and the first `validation` of those check the written checkpoint's logits. `info` goes into the block."""

    tokens: torch.Tensor
    held_out: int
    validation: int
    info: dict

    @classmethod
    def load(cls, calib: Path | None, tokenizer, samples: int, seq_len: int, held_out: float) -> CalibrationData:
        """`samples` sequences of `seq_len` tokens from `calib` (default: the bundled prompts)."""
        path = Path(calib) if calib else DEFAULT_CALIBRATION
        tokens = token_sequences(read_texts(path), tokenizer, samples, seq_len)
        held = max(1, round(samples * held_out))
        info = {"source": str(path) if calib else "bundled:calibration_default.jsonl", "samples": samples,
                "seq_len": seq_len, "held_out_samples": held, "sha256": fingerprint(tokens)}
        return cls(tokens, held, min(2, held), info)

    @property
    def fit(self) -> torch.Tensor:
        return self.tokens[: self.tokens.shape[0] - self.held_out]

    @property
    def validation_tokens(self) -> torch.Tensor:
        return self.tokens[self.tokens.shape[0] - self.held_out:][: self.validation]

    @property
    def refit_tokens(self) -> torch.Tensor:
        """Every sequence but the validation rows, which must stay unseen for the post-write check (--refit)."""
        first = self.tokens.shape[0] - self.held_out
        return torch.cat([self.tokens[:first], self.tokens[first + self.validation:]])


@dataclass
class Analysis:
    """Everything measured before writing, and the plan chosen from it.

    candidates: (first layer, span size) → factorization of every span the budget could pick (factors on disk in
    `store`); pairs / group_similarity: hidden-state, K/V and latent similarities (the paper's observation);
    final_hidden: the source's normed final hidden states on the validation rows; samples: with
    keep_tokens > 0, per layer the same tokens' activations (hidden, input, key, value) for `commonkv analyze`;
    sharing: KVSharer's search (sharer → source), if the method has one.
    """

    facts: ArchFacts
    data: CalibrationData
    plan: list[Option]
    requested_ratio: float
    store: CandidateStore
    final_hidden: torch.Tensor | None
    candidates: dict[tuple[int, int], Candidate] = field(default_factory=dict)
    pairs: list[dict] = field(default_factory=list)
    group_similarity: dict[tuple[int, int], float] = field(default_factory=dict)
    samples: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    sharing: SharingPlan | None = None
    kept_quant_error: dict[int, dict[int, tuple[float, float]]] = field(default_factory=dict)  # layer → bits → (k, v)
    decode_shape: Shape | None = None  # the source's shape for decode-cost predictions (decode_cost.py)
    element_size: int = 4  # bytes per element of the source's dtype: what its cache holds unquantized
    # layer → role → [(estimated error, KL)] (sensitivity.probe; the planner fits its curves); None: not measured
    sensitivity: dict[int, dict[str, list[tuple[float, float]]]] | None = None
    # layer → the factorization of its values alone (factors in `store`): what a `latent_values` option stores
    value_candidates: dict[int, Candidate] = field(default_factory=dict)

    @property
    def calibration(self) -> dict:
        return self.data.info

    @property
    def validation_tokens(self) -> torch.Tensor:
        return self.data.validation_tokens

    @property
    def elements(self) -> int:
        return plan_cost(self.plan)

    @property
    def achieved_ratio(self) -> float:
        """Fraction of the full cache's bytes at 16 bits the plan removes (bytes as the planner prices them)."""
        return 1.0 - plan_bits(self.plan) / (self.facts.kv_elements_per_token * FULL_BITS)
