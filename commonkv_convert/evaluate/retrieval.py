"""Retrieval from long contexts: needle-in-a-haystack and RULER-style tasks, built offline from real text.

Every probe is a prompt of a chosen length: a stretch of the Paul Graham essays with facts ("needles")
inserted at sentence boundaries at given depths, then a question and the start of the answer. The model
prefills the prompt into its (possibly compressed) cache and decodes greedily; a probe scores the share of
expected answer strings found in the output (RULER's string-match recall). Tasks, after RULER:

- ``niah``: one needle, a 7-digit number for a key word; asked at several depths and context lengths.
- ``multikey``: four needles with different keys; the question asks for one (the others are distractors).
- ``multivalue``: four needles with the same key and different numbers; all four must be recalled.
- ``vt``: variable tracking: a value assigned to a variable, then passed along a chain of 3 more variables
  spread through the text; all variable names of the chain must be recalled.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from ..architectures import CACHE_KWARG, cache_of
from ..errors import UserInputError
from .text import essays_text

HAYSTACK_CHARS = 400_000  # ~90k tokens of essays: enough for several distinct 8k-token haystacks
KEYS = ("apple", "river", "lantern", "falcon", "meadow", "copper", "harbor", "violet", "thunder", "pebble",
        "orchid", "glacier", "saddle", "walnut", "comet", "ember")
RULER_TASKS = ("niah", "multikey", "multivalue", "vt")


@dataclass(frozen=True)
class Probe:
    task: str
    context: int  # prompt length in tokens (haystack + needles + question)
    depth: float  # where the (first) needle sits, as a fraction of the haystack
    prompt: torch.Tensor  # [T] token ids
    answers: tuple[str, ...]  # strings the output must contain
    max_new_tokens: int
    question_at: int  # prompt[question_at:] is the question (and the start of the answer)


@lru_cache(maxsize=4)
def _haystack(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], frozenset[int]]:
    """Essay token ids, and the ids after which a new sentence may start (the token ends a sentence)."""
    ids = tokenizer(essays_text()[:HAYSTACK_CHARS], add_special_tokens=False)["input_ids"]
    ends = frozenset(i for i in set(ids) if tokenizer.decode([i]).rstrip().endswith((".", "!", "?")))
    return ids, ends


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_prompt(tokenizer: PreTrainedTokenizerBase, context: int, needles: list[tuple[float, str]],
                 question: str, offset: int) -> torch.Tensor:
    """`context` tokens: essay text from token `offset` with each needle sentence inserted at the sentence
    boundary nearest its depth, then the question. Needles and question are tokenized on their own."""
    hay, ends = _haystack(tokenizer)
    tail = _ids(tokenizer, question)
    pieces = [_ids(tokenizer, " " + text) for _, text in needles]
    room = context - len(tail) - sum(map(len, pieces))
    if room < 16:
        raise UserInputError(f"context {context} tokens cannot hold this probe's needles and question (they take "
                             f"{context - room}). To resolve, pass a longer --context.")
    if offset + room > len(hay):
        raise UserInputError(f"context {context} tokens is longer than the essay text ({len(hay)} tokens). "
                             "To resolve, pass a shorter --context.")
    text = hay[offset:offset + room]
    out, last = [], 0
    for (depth, _), piece in sorted(zip(needles, pieces), key=lambda item: item[0][0]):
        at = max(last, min(room, round(depth * room)))
        while at > last and text[at - 1] not in ends:  # back up to the end of the previous sentence
            at -= 1
        out += text[last:at] + piece
        last = at
    out += text[last:] + tail
    return torch.tensor(out, dtype=torch.long)


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def make_probes(tokenizer: PreTrainedTokenizerBase, task: str, context: int, samples: int, *,
                depths: tuple[float, ...] | None = None, seed: int = 0) -> list[Probe]:
    """Deterministic probes of one task at one context length (`depths` for niah; others spread needles)."""
    rng = random.Random(f"{task}/{context}/{seed}")
    hay_len = len(_haystack(tokenizer)[0])
    probes = []
    depths = depths or tuple((i + 0.5) / samples for i in range(samples))
    for i in range(samples if task != "niah" else len(depths)):
        offset = rng.randrange(0, max(1, hay_len - context - 1))
        keys = rng.sample(KEYS, 4)
        if task == "niah":
            value = _number(rng)
            needles = [(depths[i], f"The special magic number for {keys[0]} is {value}.")]
            question = (f"\n\nQuestion: What is the special magic number for {keys[0]} mentioned in the text above?"
                        f"\nAnswer: The special magic number for {keys[0]} is")
            answers, depth = (value,), depths[i]
        elif task == "multikey":
            values = [_number(rng) for _ in keys]
            spots = sorted(rng.uniform(0.05, 0.95) for _ in keys)
            needles = [(d, f"The special magic number for {k} is {v}.") for d, k, v in zip(spots, keys, values)]
            asked = rng.randrange(4)
            question = (f"\n\nQuestion: What is the special magic number for {keys[asked]} mentioned in the text "
                        f"above?\nAnswer: The special magic number for {keys[asked]} is")
            answers, depth = (values[asked],), spots[asked]
        elif task == "multivalue":
            values = [_number(rng) for _ in keys]
            spots = sorted(rng.uniform(0.05, 0.95) for _ in keys)
            needles = [(d, f"One of the special magic numbers for {keys[0]} is {v}.") for d, v in zip(spots, values)]
            question = (f"\n\nQuestion: What are all the special magic numbers for {keys[0]} mentioned in the text "
                        f"above?\nAnswer: The special magic numbers for {keys[0]} are")
            answers, depth = tuple(values), spots[0]
        elif task == "vt":
            names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
            value = str(rng.randrange(10_000, 100_000))
            spots = sorted(rng.uniform(0.05, 0.95) for _ in names)
            chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
            needles = list(zip(spots, chain))
            question = (f"\n\nQuestion: Find all variables that are assigned the value {value} in the text above."
                        f"\nAnswer: The variables assigned the value {value} are:")
            answers, depth = tuple(names), spots[0]
        else:
            raise ValueError(f"unknown retrieval task {task!r}; known: {', '.join(RULER_TASKS)}")
        prompt = build_prompt(tokenizer, context, needles, question, offset)
        width = sum(len(_ids(tokenizer, " " + a)) + 2 for a in answers) + 2
        at = len(prompt) - len(_ids(tokenizer, question))
        probes.append(Probe(task, context, round(depth, 3), prompt, answers, width, at))
    return probes


@torch.inference_mode()
def greedy_answer(model: PreTrainedModel, prompt: torch.Tensor, max_new_tokens: int,
                  new_cache: Callable[[], Cache | None] = lambda: None, question_at: int | None = None) -> list[int]:
    """Prefill the prompt into the cache, then decode greedily at explicit positions (so a cache that keeps
    fewer tokens than it has seen, e.g. after eviction, still decodes at the true positions).

    With `question_at`, only prompt[:question_at] is prefilled (and compressed, where the cache compresses
    after a prefill); the question follows in a second forward: eviction cannot know what will be asked."""
    ids = prompt.reshape(1, -1).to(model.device)
    if question_at is None:
        out = model(input_ids=ids, **{CACHE_KWARG: new_cache()}, use_cache=True, logits_to_keep=1)
    else:
        context = model(input_ids=ids[:, :question_at], **{CACHE_KWARG: new_cache()}, use_cache=True, logits_to_keep=1)
        position = torch.arange(question_at, ids.shape[1], device=model.device).unsqueeze(0)
        out = model(input_ids=ids[:, question_at:], **{CACHE_KWARG: cache_of(context)}, position_ids=position,
                    use_cache=True, logits_to_keep=1)
    tokens = [int(out.logits[0, -1].argmax())]
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    stop = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    for step in range(max_new_tokens - 1):
        if tokens[-1] in stop:
            break
        position = torch.tensor([[ids.shape[1] + step]], device=model.device)
        out = model(input_ids=torch.tensor([[tokens[-1]]], device=model.device), **{CACHE_KWARG: cache_of(out)},
                    position_ids=position, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def score_probe(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, probe: Probe,
                new_cache: Callable[[], Cache | None] = lambda: None, ask_after: bool = False) -> dict:
    """Recall of the probe's answers in the greedy output, and the output itself (for reading failures).
    `ask_after`: the context is compressed before the question is seen (see `greedy_answer`)."""
    answer = greedy_answer(model, probe.prompt, probe.max_new_tokens, new_cache,
                           probe.question_at if ask_after else None)
    text = tokenizer.decode(answer, skip_special_tokens=True)
    found = sum(answer in text for answer in probe.answers)
    return {"task": probe.task, "context": probe.context, "depth": probe.depth,
            "score": found / len(probe.answers), "output": text.strip()}
