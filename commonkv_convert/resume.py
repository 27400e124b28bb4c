"""Resumable conversions: a work directory beside the output records finished work on disk.

    OUT/../.OUT.commonkv-work/
      manifest.json                fingerprint; layers calibrated and factorized; shards written (+ sha256)
      act/{kind}-{layer}.safetensors  calibration activations needed to continue at the next layer
      grams/{layer}.safetensors    Grams of the layers a later span may still read (dropped after)
      layers/{layer}.pt            per-layer scalars (similarities, token counts)
      candidates/{first}-{size}.pt factors and held-out errors of every candidate span
      candidates/{layer}-1-values.pt  the same of each layer's values alone (latent_values options)
      out/                         the checkpoint being written, renamed to OUT when complete

Rerunning the same command after a crash (even kill -9) continues from the last finished layer or shard
and writes the same bytes as an uninterrupted run, because every stage reads back exactly what it would
have held in memory. The work is only reused when a fingerprint of the tool version, the options, the
source files and the calibration token ids matches; otherwise it is discarded with a notice. The
directory is removed once the checkpoint and its report are in place. Writes are atomic renames but
not fsync'ed: a killed process loses nothing, a power cut may need a fresh start.

Test hook: COMMONKV_TEST_CRASH_AFTER=layer:N (or shard:N) kills the process with SIGKILL right after the
N-th layer (shard) is recorded, so tests can interrupt a conversion at a known point.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .calibrate import Carry, LayerStats
from .errors import UserInputError
from .factorize import Candidate
from .weighted import WeightedCandidate, up_at_rank

SPLITS = ("fit", "held_out")
MANIFEST = "manifest.json"
LOCK = "lock"


class LazyGrams(Mapping):
    """key -> d × d Gram read from disk on each access, so the window of layers costs no RAM."""

    def __init__(self, path: Path, keys: list) -> None:
        self._path, self._keys = path, keys

    def __getitem__(self, key) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return read_tensor(self._path, str(key))

    def __iter__(self) -> Iterator:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class WorkDir:
    """The on-disk state of one conversion (see the module docstring)."""

    def __init__(self, root: Path, *, persistent: bool) -> None:
        self.root = root
        self.persistent = persistent  # False: a temporary directory (dry runs, library calls without output)
        self.manifest: dict = {}
        self._lock = None

    @classmethod
    def for_output(cls, out_dir: Path | None) -> WorkDir:
        if out_dir is None:
            return cls(Path(tempfile.mkdtemp(prefix="commonkv-work-")), persistent=False)
        out_dir = Path(out_dir).expanduser().absolute()
        return cls(out_dir.parent / f".{out_dir.name}.commonkv-work", persistent=True)

    # -- manifest ------------------------------------------------------------------------------------
    def bind(self, fingerprint: str, log) -> bool:
        """Adopt the existing work if it was made for the same fingerprint; start over otherwise.
        Returns whether anything is resumed. Holds an exclusive lock on the directory until the process ends, so
        two conversions to the same output cannot mix their work."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / LOCK, "a")  # noqa: SIM115 - held for the life of the process
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserInputError(f"Another conversion is using {self.root}. To resolve, wait for it to finish or "
                                 "choose another output directory.") from None
        old = self._read_manifest()
        if old is not None and old.get("fingerprint") == fingerprint:
            self.manifest = old
            if old.get("layers_done", 0) or old.get("shards"):
                log(f"Resuming from {self.root}: {old.get('layers_done', 0)} layers analyzed, "
                    f"{len(old.get('shards', []))} shards written.")
                return True
            return False
        if old is not None:
            log(f"Found unfinished work for a different conversion in {self.root}; starting over.")
        for stale in self.root.iterdir():
            if stale.name != LOCK:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        for sub in ("act", "grams", "layers", "candidates"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.manifest = {"fingerprint": fingerprint, "layers_done": 0, "shards": []}
        self._write_manifest()
        return False

    @property
    def layers_done(self) -> int:
        return int(self.manifest.get("layers_done", 0))

    def layer_done(self, layer: int, keep_from: dict[str, int]) -> None:
        """Record that `layer` is calibrated and factorized; drop files no later stage reads."""
        self.manifest["layers_done"] = layer + 1
        self._write_manifest()
        for file in (self.root / "act").glob("*.safetensors"):
            kind, _, idx = file.stem.rpartition("-")
            if int(idx) < keep_from.get(kind, 0):
                file.unlink(missing_ok=True)
        for file in (self.root / "grams").glob("*.safetensors"):
            if int(file.stem) < keep_from["grams"]:
                file.unlink(missing_ok=True)
        crash_point("layer", layer + 1)

    def shard_written(self, index: int, path: Path, tensors: list[str], data_bytes: int) -> None:
        self.manifest["shards"] = self.manifest["shards"][:index] + [{
            "file": path.name, "sha256": sha256_file(path), "data_bytes": data_bytes, "tensors": tensors}]
        self._write_manifest()
        crash_point("shard", index + 1)

    def written_shards(self, out: Path) -> list[dict]:
        """Shards recorded as written whose files are still intact (a prefix of the recorded list)."""
        intact = []
        for shard in self.manifest.get("shards", []):
            path = out / shard["file"]
            if not path.is_file() or sha256_file(path) != shard["sha256"]:
                break
            intact.append(shard)
        self.manifest["shards"] = intact
        return intact

    def _read_manifest(self) -> dict | None:
        try:
            return json.loads((self.root / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _write_manifest(self) -> None:
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1))
        tmp.replace(self.root / MANIFEST)

    # -- tensors -------------------------------------------------------------------------------------
    def save(self, rel: str, obj) -> None:
        """torch.save through a temporary name, so a file that exists is always complete."""
        path = self.root / rel
        tmp = path.with_name(path.name + ".tmp")
        torch.save(obj, tmp)
        tmp.replace(path)

    def load(self, rel: str):
        return torch.load(self.root / rel, weights_only=True)

    def save_tensors(self, rel: str, tensors: dict[str, torch.Tensor]) -> None:
        """Plain tensors as safetensors (atomic like `save`): no pickle and no CRC pass, so the ~50 MB of
        activations and Grams saved per SmolLM2 layer cost a plain write, and one Gram reads back alone."""
        path = self.root / rel
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        tmp.replace(path)

    def save_grams(self, layer: int, gram: dict, cross: dict,
                   probe: torch.Tensor | None = None) -> tuple[LazyGrams, dict[str, LazyGrams]]:
        """Write a layer's Grams (and its held-out probe activations, which live as long) to disk and return lazy
        views that read the Grams back on demand."""
        flat = {split: g for split, g in gram.items()}
        flat.update({f"{split}/{j}": c for split, per in cross.items() for j, c in per.items()})
        if probe is not None:
            flat["probe"] = probe
        self.save_tensors(f"grams/{layer}.safetensors", flat)
        return self.grams(layer, list(gram), {split: list(per) for split, per in cross.items()})

    def grams(self, layer: int, splits: list[str], cross: dict[str, list[int]]) -> tuple[LazyGrams, dict]:
        path = self.root / f"grams/{layer}.safetensors"
        lazy = {split: _CrossView(path, split, js) for split, js in cross.items()}
        return LazyGrams(path, list(splits)), lazy

    def probe(self, layer: int) -> torch.Tensor:
        return read_tensor(self.root / f"grams/{layer}.safetensors", "probe")

    def close(self, *, remove: bool) -> None:
        if remove or not self.persistent:
            shutil.rmtree(self.root, ignore_errors=True)
            if self._lock is not None:
                self._lock.close()
                self._lock = None


class _CrossView(Mapping):
    """j -> X_l X_jᵀ of one split, read from the layer's Gram file on access."""

    def __init__(self, path: Path, split: str, js: list[int]) -> None:
        self._path, self._split, self._js = path, split, js

    def __getitem__(self, j: int) -> torch.Tensor:
        if j not in self._js:
            raise KeyError(j)
        return read_tensor(self._path, f"{self._split}/{j}")

    def __iter__(self) -> Iterator:
        return iter(self._js)

    def __len__(self) -> int:
        return len(self._js)


class CalibrationCache:
    """`calibrate` behind the work directory: the layers a previous run finished are read back, the rest are
    computed, and each new layer's statistics and Carry are saved as it is yielded. A layer is recorded as done
    only when the consumer asks for the next one, i.e. after it has stored the layer's candidates too."""

    def __init__(self, work: WorkDir, max_group: int) -> None:
        self.work, self.max_group = work, max_group
        self.start = work.layers_done

    def finished(self) -> dict[int, LayerStats]:
        """Scalars of every finished layer (their Grams are gone or lazy; see `window`)."""
        return {l: LayerStats(l, {}, {}, **self.work.load(f"layers/{l}.pt")) for l in range(self.start)}

    def window(self) -> list[LayerStats]:
        """The finished layers a span ending at a new layer may still include, with their Grams read lazily."""
        out, group = [], self.max_group
        for l in range(max(0, self.start - group + 1), self.start):
            cross = {split: list(range(max(0, l - group + 1), l)) if group > 1 else [] for split in SPLITS}
            out.append(LayerStats(l, *self.work.grams(l, list(SPLITS), cross), probe=self.work.probe(l),
                                  **self.work.load(f"layers/{l}.pt")))
        return out

    def run(self, source, facts, tokens: torch.Tensor, **kwargs) -> Iterator[LayerStats]:
        """calibrate(source, facts, tokens, **kwargs) from the first unfinished layer; Grams come back lazy."""
        from .calibrate import calibrate

        start, group = self.start, self.max_group
        carry = self._carry(start) if start else None
        for stats, carry in calibrate(source, facts, tokens, max_group=group, start=start, carry=carry, **kwargs):
            i = stats.layer
            for kind, tensor, at in (("hidden", carry.hidden, i + 1), ("key", carry.previous["key"], i),
                                     ("value", carry.previous["value"], i), ("x", (carry.window or [None])[-1], i)):
                if tensor is not None:
                    self._save(kind, at, tensor)
            if i == 0:
                self._save("hidden", 0, carry.previous["hidden"])
            stats.gram, stats.cross = self.work.save_grams(i, stats.gram, stats.cross, stats.probe)
            self.work.save(f"layers/{i}.pt", {"cos_prev": stats.cos_prev, "tokens": stats.tokens,
                                             "samples": stats.samples, "quant_error": stats.quant_error,
                                             "query_energy": stats.query_energy})
            yield stats
            nxt = i + 1  # what continuing after layer i still reads
            self.work.layer_done(i, {"hidden": nxt - 1, "key": nxt - 1, "value": nxt - 1,
                                     "x": nxt - max(group - 1, 1), "grams": nxt - group + 1})

    def _carry(self, start: int) -> Carry:
        previous = {kind: self._load(kind, start - 1) for kind in ("hidden", "key", "value")}
        window = [self._load("x", j) for j in range(max(0, start - max(self.max_group - 1, 1)), start)] \
            if self.max_group > 1 else []
        return Carry(self._load("hidden", start), previous, window)

    def _save(self, kind: str, layer: int, tensor: torch.Tensor) -> None:
        self.work.save_tensors(f"act/{kind}-{layer}.safetensors", {kind: tensor})

    def _load(self, kind: str, layer: int) -> torch.Tensor:
        return read_tensor(self.work.root / f"act/{kind}-{layer}.safetensors", kind)


VALUES_SUFFIX = "-values"  # a stored layer's values-only candidate: candidates/{layer}-1-values.pt


class CandidateStore:
    """Factors of every candidate span live on disk until the plan picks a few: memory stays O(window).

    A 30-layer model with group size 4 has ~110 candidates; in memory they would cost more than the model.
    """

    def __init__(self, work: WorkDir) -> None:
        self._work = work

    def put(self, cand: Candidate, similarity: float | None = None, *, values_only: bool = False) -> Candidate:
        rel = f"candidates/{cand.layers[0]}-{len(cand.layers)}{VALUES_SUFFIX if values_only else ''}.pt"
        saved = {"down": cand.down.float(), "up": {l: b.float() for l, b in cand.up.items()},
                 "meta": {"layers": list(cand.layers), "predictor": cand.predictor, "ranks": cand.ranks,
                          "err_k": cand.err_k, "err_v": cand.err_v, "quant_error": cand.quant_error,
                          "similarity": similarity}}
        if isinstance(cand, WeightedCandidate):  # its up-projections are U_l; B_l needs the Cholesky L_l too
            saved["chol"] = cand.chol
            saved["meta"]["merge_weights"] = cand.merge_weights
            cand.chol = {}
        self._work.save(rel, saved)
        cand.down, cand.up = None, {}
        cand.path = self._work.root / rel
        return cand

    def restore(self, layers_done: int) -> tuple[dict[tuple[int, int], Candidate], dict[tuple[int, int], float],
                                                 dict[int, Candidate]]:
        """Candidates of spans ending before `layers_done`, in the order they were made, their similarities, and
        the values-only candidates of those layers."""
        root = self._work.root / "candidates"
        keys = [tuple(map(int, f.stem.split("-"))) for f in root.glob("*-*.pt") if not f.stem.endswith(VALUES_SUFFIX)]
        keys = sorted((k for k in keys if k[0] + k[1] <= layers_done), key=lambda k: (k[0] + k[1], k[1]))
        candidates, similarity = {}, {}
        for first, size in keys:
            path = root / f"{first}-{size}.pt"
            candidates[(first, size)], meta = self._restore(path)
            if meta["similarity"] is not None:
                similarity[(first, size)] = meta["similarity"]
        values = {layer: self._restore(root / f"{layer}-1{VALUES_SUFFIX}.pt")[0] for layer in range(layers_done)
                  if (root / f"{layer}-1{VALUES_SUFFIX}.pt").is_file()}
        return candidates, similarity, values

    @staticmethod
    def _restore(path: Path) -> tuple[Candidate, dict]:
        """A stored candidate without its factors (read again by `factors` when the plan picks it), and its meta."""
        meta = torch.load(path, weights_only=True)["meta"]
        weighted = "merge_weights" in meta
        cls = WeightedCandidate if weighted else Candidate
        extra = {"merge_weights": meta["merge_weights"]} if weighted else {}
        return cls(tuple(meta["layers"]), meta["predictor"], None, {}, meta["ranks"], meta["err_k"], meta["err_v"],
                   path=path, quant_error=meta.get("quant_error"), **extra), meta

    @staticmethod
    def factors(cand: Candidate, rank: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The candidate's down-projection and per-layer up-projections truncated to `rank`, from disk."""
        saved = torch.load(cand.path, weights_only=True)
        if "chol" in saved:
            ups = {l: up_at_rank(u.double(), saved["chol"][l], rank).float() for l, u in saved["up"].items()}
            return saved["down"][:rank], ups
        return saved["down"][:rank], {l: b[:, :rank] for l, b in saved["up"].items()}

    def close(self) -> None:
        self._work.close(remove=False)  # a temporary work directory goes; a resumable one stays until done


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, read on its own (the file's other tensors are not touched)."""
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


def fingerprint(options: dict, source_path: Path, weight_files: list[Path], config: dict, tokens_sha: str) -> str:
    """sha256 over everything that determines the output. Source files count by name, size and mtime: hashing
    a 100 GB checkpoint on every start would cost more than most resumes save."""
    files = sorted({(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weight_files})
    payload = {"tool": __version__, "options": {k: v for k, v in options.items() if k != "validate"},
               "source": str(source_path), "files": files, "config": config, "calibration": tokens_sha}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def crash_point(stage: str, count: int) -> None:
    """The test hook of the module docstring: SIGKILL ourselves at `stage:count` when asked to."""
    if os.environ.get("COMMONKV_TEST_CRASH_AFTER") == f"{stage}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)
