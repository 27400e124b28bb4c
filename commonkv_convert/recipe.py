"""Conversion options: one dataclass drives the CLI flags, the library call and the recipe YAML."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserInputError


def _cache_options_class():
    """The runtime's KVCacheOptions, read from its file by path: importing the runtime package pulls in torch
    and transformers, which every `--help` would wait for."""
    name = "commonkv_convert_cache_options"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "runtime" / "cache_options.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name].KVCacheOptions


KVCacheOptions = _cache_options_class()

# The parts the options fall into (the CLI shows one help panel per part).
CALIBRATION, FACTORIZATION, BUDGET, SHARING, OUTPUT = "Calibration", "Factorization", "Budget", "KVSharer", "Output"


def option(default, help: str, part: str, *flags: str, sweep: bool = False):
    """A conversion option: its default, its help, its part, and CLI flags where they differ from --field-name
    (booleans: "--on/--off"). `sweep`: it steers only the budget stage and the writer, so a sweep may vary it
    after one analysis. The CLI, the recipe, sweeps and the library all read this one declaration."""
    return field(default=default, metadata={"help": help, "part": part, "flags": flags, "sweep": sweep})


@dataclass(frozen=True)
class ConvertOptions:
    """Every option of a conversion, validated once when constructed; the recipe YAML is its flat dict."""

    ratio: float = option(0.5, "Fraction of KV-cache memory to remove, in [0, 1).", BUDGET, sweep=True)
    group_size: int = option(4, "Largest number of adjacent layers that may share one latent (1: no merging).",
                             BUDGET, sweep=True)
    bits: str = option("16", "Precisions the planner may store each group at, comma-separated from 16, 8, 4, 2 "
                             "(16: unquantized). With more than 16 it trades rank and merging against precision, "
                             "and --ratio counts bytes against the full cache at 16 bits, e.g. 16,8,4.", BUDGET,
                       sweep=True)
    context: int = option(4096, "--bits: context length at which the planner prices a quantized group's unquantized "
                                "recent tokens.", BUDGET, sweep=True)
    quant_group: int = option(KVCacheOptions.group, "--bits: values per quantization group (tokens of a channel, "
                                                    "features of a token; a multiple of 4). Each precision's error is "
                                                    "measured at it and the checkpoint's runtime uses it, e.g. 64: "
                                                    "half the scale bytes, coarser codes.", BUDGET)
    quant_sink: int = option(KVCacheOptions.sink, "--bits: first tokens of every quantized stream kept in the model "
                                                  "dtype and out of their group's range (attention sinks: the first "
                                                  "token's outliers would coarsen its group). Each precision's error "
                                                  "is measured with them and the checkpoint's runtime keeps them, "
                                                  "e.g. 1.", BUDGET)
    quant_clip: bool = option(KVCacheOptions.clip, "--bits: give each quantization group the range that reads it "
                                                   "back with the least squared error, of its min-max range and a "
                                                   "few shrunk ones (2 bits: about half the error). Each "
                                                   "precision's error is measured with it and the checkpoint's "
                                                   "runtime uses it.", BUDGET, "--quant-clip/--no-quant-clip")
    residual: int = option(KVCacheOptions.residual, "--bits: most recent tokens a quantized group keeps unquantized; "
                                                    "the checkpoint's runtime uses it (0: quantize every whole group).",
                           BUDGET, sweep=True)
    max_decode_cost: float | None = option(None, "Largest predicted decode step against the full cache's "
                                                 "(commonkv_convert/decode_cost.py: one sequence at --context tokens, "
                                                 "2-core CPU balance), e.g. 1.0: the best plan within both budgets.",
                                           BUDGET, sweep=True)
    latent_values: bool = option(False, "Also let the planner keep a layer's keys (at the group's precision) and store "
                                        "only a latent of its values, attended in latent space: no key is rebuilt "
                                        "at a decode step, at head_dim·kv_heads + rank elements per token. Pairs "
                                        "with --max-decode-cost and --bits.", BUDGET,
                                 "--latent-values/--no-latent-values", sweep=True)
    latent_tail: bool = option(False, "--bits: also let the planner store a latent's trailing channels (its SVD's "
                                      "weakest directions) at the next lower allowed precision than its leading "
                                      "ones, e.g. channels 0-95 at 4 bits and the rest at 2.", BUDGET,
                               "--latent-tail/--no-latent-tail", sweep=True)
    layer_weights: str = option("kl", "How the planner weighs each layer's estimated K/V errors: kl (by their measured "
                                      "effect on the output, the KL divergence of the next-token distribution on "
                                      "held-out tokens with that layer alone compressed) or uniform.", BUDGET,
                                sweep=True)
    calib: Path | None = option(None, "Calibration text, .txt or .jsonl with {\"text\": ...} lines; default: bundled "
                                      "prompts.", CALIBRATION)
    samples: int = option(32, "Calibration sequences.", CALIBRATION)
    seq_len: int = option(256, "Tokens per calibration sequence.", CALIBRATION)
    held_out: float = option(0.125, "Share of sequences kept out of the fit to measure errors.", CALIBRATION)
    rank_step: int = option(8, "Latent ranks are multiples of this.", FACTORIZATION)
    plain_svd: bool = option(False, "Plain SVD of the weights instead of activation-aware (to compare).",
                             FACTORIZATION, "--plain-svd/--whitened-svd")
    allocator: str = option("optimal", "optimal (search) or uniform (same group size and rank).", BUDGET, sweep=True)
    allow_keep: bool = option(True, "Let the allocator leave layers uncompressed (--no-keep: every layer gets a "
                                    "latent, up to full rank; for exactness checks).", BUDGET, "--keep/--no-keep",
                             sweep=True)
    balance: bool = option(True, "Equalize key and value energy before the joint SVD.", FACTORIZATION,
                           "--balance/--no-balance")
    value_metric: str = option("output", "Measure value error after o_proj (output) or as is (plain).", FACTORIZATION)
    key_metric: str = option("plain", "Measure key error as the attention-score error it causes (query: weighted by "
                                      "the calibration queries' energy per channel) or as is (plain).", FACTORIZATION)
    value_weight: float = option(1.0, "Weight of value error relative to key error.", FACTORIZATION)
    factor_weights: str = option("energy", "How the joint SVD weighs each layer's key and value errors: energy (each "
                                           "relative to its own energy, all alike) or kl (by the slope of the layer's "
                                           "measured KL curves at the errors a per-layer plan gives them: a first "
                                           "pass over per-layer latents measures the sensitivities, about one more "
                                           "calibration).", FACTORIZATION)
    refit: str = option("none", "Once planned, refit each group's factors on all calibration tokens but the "
                                "validation rows (pooled), also fed by the compressed layers before it (sequential), "
                                "with targets from that same compressed stream (symmetric), or not (none).",
                        FACTORIZATION,
                        sweep=True)
    merge: str = option("anchor", "How merged groups store old tokens: anchor (the first layer's latent, causal) or "
                                  "weighted (the CommonKV paper's calibrated weighted sum; per-layer sinks and recent "
                                  "window).", FACTORIZATION)
    sink: int = option(4, "weighted merge: first tokens each layer keeps as its own latent.", FACTORIZATION)
    window: int = option(32, "weighted merge: recent tokens each layer keeps at least.", FACTORIZATION)
    block: int = option(16, "weighted merge: tokens are merged K at a time.", FACTORIZATION)
    method: str = option("commonkv", "commonkv (latent sharing), kvsharer (layers reuse another layer's whole cache) "
                                     "or commonkv+kvsharer (--share-layers sharers, CommonKV over the rest to reach "
                                     "--ratio).", SHARING)
    share_layers: int | None = option(None, "KVSharer: layers that reuse another layer's cache (kvsharer: default "
                                            "round(ratio · layers)).", SHARING)
    share_threshold: float = option(0.5, "KVSharer: keep a sharing only if the final hidden states' cosine with the "
                                         "source model stays above this.", SHARING, "--share-threshold", "--threshold")
    share_order: str = option("dissimilar-first", "KVSharer: try layer pairs dissimilar-first (the paper) or "
                                                  "similar-first (the control).", SHARING)
    share_latent: str = option("refit", "commonkv+kvsharer: a sharer reads a latent source through its own refit "
                                        "up-projections (refit) or the source's (source).", SHARING, sweep=True)
    max_shard_size: str = option("2GB", "Largest safetensors shard, e.g. 2GB.", OUTPUT, sweep=True)
    allow_pickle: bool = option(False, "Allow loading pickle (.bin) weights.", OUTPUT,
                                "--allow-pickle/--no-allow-pickle")
    revision: str | None = option(None, "Hub revision (branch, tag or commit).", OUTPUT)
    base_model: str | None = option(None, "Hub id of the source model, for the card's base_model (default: MODEL when "
                                          "it is a Hub id, else the id its config records in _name_or_path).", OUTPUT,
                                    sweep=True)
    validate: bool = option(True, "Compare logits and cache bytes after writing.", OUTPUT, "--validate/--no-validate",
                            sweep=True)
    max_kl: float = option(2.0, "Validation fails (exit 7, output removed) when the mean KL(source ‖ converted) of "
                                "the next-token distributions exceeds this many nats (SmolLM2 at ratio 0.5: 0.2).",
                           OUTPUT, sweep=True)
    device: str = option("auto", "Where calibration and factorization run: cpu, cuda (all GPUs, layers round-robin), "
                                 "cuda:N or auto.", CALIBRATION)

    def __post_init__(self) -> None:
        if isinstance(self.calib, str):
            object.__setattr__(self, "calib", Path(self.calib))
        self.check()

    @classmethod
    def sweep_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["sweep"])

    def check(self) -> None:
        """Reject nonsense before any work starts (run at construction); each message names the fix."""
        if not 0.0 <= self.ratio < 1.0:
            raise UserInputError(f"--ratio {self.ratio} is outside [0, 1). To resolve, pass e.g. --ratio 0.5.")
        if self.group_size < 1:
            raise UserInputError(f"--group-size {self.group_size} is below 1. To resolve, pass 1 (no merging) or more.")
        if self.samples < 2:
            raise UserInputError("--samples must be at least 2 (one to fit, one to measure). To resolve, pass --samples 32.")
        if self.seq_len < 8:
            raise UserInputError(f"--seq-len {self.seq_len} is too short. To resolve, pass --seq-len 256.")
        if not 0.0 < self.held_out < 1.0:
            raise UserInputError(f"--held-out {self.held_out} is outside (0, 1). To resolve, pass e.g. 0.25.")
        if not self.max_kl > 0:
            raise UserInputError(f"--max-kl {self.max_kl} must be positive. To resolve, pass e.g. --max-kl 2.0.")
        parse_bits(self.bits)
        if self.max_decode_cost is not None and not self.max_decode_cost > 0:
            raise UserInputError(f"--max-decode-cost {self.max_decode_cost} must be positive. To resolve, pass e.g. 1.0.")
        if self.context < 1:
            raise UserInputError(f"--context {self.context} is below 1. To resolve, pass e.g. 4096.")
        try:
            KVCacheOptions(group=self.quant_group, residual=self.residual, sink=self.quant_sink)
        except ValueError as err:
            default = KVCacheOptions()
            raise UserInputError(f"--quant-group {self.quant_group} / --residual {self.residual} / --quant-sink "
                                 f"{self.quant_sink}: {err} To resolve, pass e.g. --quant-group {default.group} "
                                 f"--residual {default.residual} --quant-sink {default.sink}.") from None
        if self.rank_step < 1:
            raise UserInputError(f"--rank-step {self.rank_step} is below 1. To resolve, pass e.g. 8.")
        if self.allocator not in ("optimal", "uniform"):
            raise UserInputError(f"--allocator {self.allocator!r} is unknown. To resolve, pass optimal or uniform.")
        if self.merge not in ("anchor", "weighted"):
            raise UserInputError(f"--merge {self.merge!r} is unknown. To resolve, pass anchor or weighted.")
        if self.sink < 0 or self.window < 0 or self.block < 1:
            raise UserInputError(f"--sink {self.sink} / --window {self.window} / --block {self.block} are invalid. "
                                 "To resolve, pass sink ≥ 0, window ≥ 0 and block ≥ 1 (defaults 4, 32, 16).")
        if not self.value_weight > 0:
            raise UserInputError(f"value_weight {self.value_weight} must be positive. To resolve, pass e.g. 1.0.")
        if self.latent_tail and sum(b < 16 for b in parse_bits(self.bits)) < 2:
            raise UserInputError(f"--latent-tail stores a latent's trailing channels at a lower precision than its "
                                 f"leading ones, and --bits {self.bits} allows fewer than two below 16. To resolve, "
                                 "pass e.g. --bits 16,8,4,2.")
        if self.latent_values and self.refit != "none":
            raise UserInputError("--latent-values cannot be combined with --refit yet (the refit rebuilds keys from the "
                                 "latent). To resolve, pass --refit none or drop --latent-values.")
        if self.layer_weights not in ("kl", "uniform"):
            raise UserInputError(f"layer_weights {self.layer_weights!r} is unknown. To resolve, pass kl or uniform.")
        if self.factor_weights not in ("energy", "kl"):
            raise UserInputError(f"--factor-weights {self.factor_weights!r} is unknown. To resolve, pass energy or kl.")
        if self.key_metric not in ("query", "plain"):
            raise UserInputError(f"--key-metric {self.key_metric!r} is unknown. To resolve, pass query or plain.")
        if self.value_metric not in ("output", "plain"):
            raise UserInputError(f"value_metric {self.value_metric!r} is unknown. To resolve, pass output or plain.")
        self._check_refit()
        self._check_sharing()
        self._check_base_model()
        # Imported here: both pull in torch, which `commonkv --version` and `--help` should not wait for.
        from .calibration_data import check_file
        from .checkpoint.writer import parse_size

        parse_size(self.max_shard_size)
        if self.calib is not None:
            check_file(Path(self.calib))

    def _check_refit(self) -> None:
        modes = ("none", "pooled", "sequential", "symmetric")  # refit.py
        if self.refit not in modes:
            raise UserInputError(f"--refit {self.refit!r} is unknown. To resolve, pass one of {', '.join(modes)}.")
        if self.refit != "none" and (self.merge != "anchor" or self.method != "commonkv"):
            raise UserInputError("--refit refits anchor-merged CommonKV groups only. To resolve, pass --refit none, "
                                 "or use --merge anchor with --method commonkv.")

    def _check_base_model(self) -> None:
        from .checkpoint.card import is_hub_id

        if self.base_model is not None and not is_hub_id(self.base_model):
            raise UserInputError(f"--base-model {self.base_model!r} is not a Hub id. To resolve, pass namespace/name, "
                                 "e.g. HuggingFaceTB/SmolLM2-135M-Instruct.")

    def _check_sharing(self) -> None:
        methods = ("commonkv", "kvsharer", "commonkv+kvsharer")
        if self.method not in methods:
            raise UserInputError(f"--method {self.method!r} is unknown. To resolve, pass one of {', '.join(methods)}.")
        if self.share_order not in ("dissimilar-first", "similar-first"):
            raise UserInputError(f"--share-order {self.share_order!r} is unknown. To resolve, pass dissimilar-first "
                                 "or similar-first.")
        if self.share_latent not in ("refit", "source"):
            raise UserInputError(f"--share-latent {self.share_latent!r} is unknown. To resolve, pass refit or source.")
        if not -1.0 <= self.share_threshold < 1.0:
            raise UserInputError(f"--threshold {self.share_threshold} is outside [-1, 1). To resolve, pass a cosine "
                                 "such as 0.5.")
        if self.share_layers is not None and self.share_layers < 1:
            raise UserInputError(f"--share-layers {self.share_layers} is below 1. To resolve, pass e.g. 4.")
        if self.method == "commonkv" and self.share_layers is not None:
            raise UserInputError("--share-layers needs a KVSharer method. To resolve, add --method kvsharer or "
                                 "--method commonkv+kvsharer.")
        if self.method == "commonkv+kvsharer":
            if self.share_layers is None:
                raise UserInputError("--method commonkv+kvsharer needs --share-layers N (--ratio sets the total). "
                                     "To resolve, pass e.g. --share-layers 4.")
            if self.merge != "anchor" or self.allocator != "optimal":
                raise UserInputError("--method commonkv+kvsharer works with --merge anchor and --allocator optimal. "
                                     "To resolve, drop --merge/--allocator.")

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: Path, **overrides) -> "ConvertOptions":
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise UserInputError(f"Cannot read recipe {path}: {err}. To resolve, pass a valid YAML file.") from None
        if not isinstance(data, dict):
            raise UserInputError(f"Recipe {path} is not a mapping of option: value. To resolve, write lines like "
                                 "`ratio: 0.5`.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(map(str, data)) - set(fields))
        if unknown:
            raise UserInputError(f"Recipe {path} has unknown keys {unknown}. To resolve, use only: {sorted(fields)}.")
        data = {key: _recipe_value(path, key, value, fields[key].default) for key, value in data.items()}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)


def written_with(checkpoint: Path, options: ConvertOptions) -> bool:
    """Whether `checkpoint` records exactly `options` as its recipe: a cached conversion is reused only then, so a
    changed default or plan converts again."""
    from .checkpoint.format import RECIPE_FILE

    try:
        return ConvertOptions.from_yaml(Path(checkpoint) / RECIPE_FILE) == options
    except UserInputError:  # missing or unreadable: not reusable
        return False


def parse_bits(text: str) -> tuple[int, ...]:
    """`--bits 16,8,4` → (16, 8, 4); a one-line error naming the fix for anything else."""
    try:
        bits = tuple(sorted({int(b) for b in str(text).split(",")}, reverse=True))
    except ValueError:
        bits = ()
    if not bits or not set(bits) <= {16, 8, 4, 2}:
        raise UserInputError(f"--bits {text!r} is not a list of precisions. To resolve, pass values from 16, 8, 4 "
                             "and 2, comma-separated, e.g. --bits 16,8,4.")
    return bits


def _recipe_value(path: Path, key: str, value, default):
    """A recipe value of the field's type (an int where a float is expected is fine), or a one-line error."""
    if value is None and default is None:  # calib, revision: null means the default
        return None
    if key == "calib" and isinstance(value, str):
        return Path(value)
    if key == "base_model" and isinstance(value, str):
        return value
    if key == "revision" and isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)  # YAML reads an all-digit commit prefix as a number
    if key == "max_shard_size" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if key == "share_layers" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if key == "max_decode_cost" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if key == "bits" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # `bits: 16` in YAML is a number
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if default is not None and isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    example = {"calib": "calib.jsonl", "revision": "main"}.get(key, default)
    raise UserInputError(f"Recipe {path}: {key} is {value!r}, which is not a valid value. "
                         f"To resolve, write e.g. `{key}: {example}`.")
