"""Task scores for generated text, the way the LoRA paper scores E2E NLG: BLEU, ROUGE-L, METEOR.

Every hypothesis is scored against all the references of its input (multi-reference), on the whole corpus:

- BLEU: `sacrebleu.corpus_bleu` (13a tokenization, the defaults the E2E scripts match);
- ROUGE-L: `rouge_score` F-measure, the best over the references of each item, averaged;
- METEOR: `nltk.translate.meteor_score` (the best over references, averaged). Its synonym stage needs the
  WordNet corpus, which nltk downloads; when that corpus is not installed the score uses the exact and
  stemmed matches only, and `meteor_variant` says so. Nothing is downloaded.

Scores are on a 0-100 scale.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class TaskScores:
    bleu: float
    rouge_l: float
    meteor: float
    meteor_variant: str  # "wordnet" or "exact+stem"
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    import sacrebleu

    width = max(len(r) for r in references)
    # sacrebleu takes reference *streams*; items with fewer references repeat their last one (no new n-grams).
    streams = [[refs[min(i, len(refs) - 1)] for refs in references] for i in range(width)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    total = sum(scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references))
    return 100.0 * total / max(1, len(hypotheses))


class _NoSynonyms:
    """Stands in for nltk's WordNet reader when the corpus is not installed: no synonym matches."""

    @staticmethod
    def synsets(_word: str) -> list:
        return []


def _wordnet():
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet, "wordnet"
    except LookupError:
        return _NoSynonyms(), "exact+stem"


def meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, str]:
    from nltk.translate.meteor_score import meteor_score

    wordnet, variant = _wordnet()

    def words(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    total = sum(
        meteor_score([words(r) for r in refs], words(hyp), wordnet=wordnet) for hyp, refs in zip(hypotheses, references)
    )
    return 100.0 * total / max(1, len(hypotheses)), variant


def score(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> TaskScores:
    """BLEU, ROUGE-L and METEOR of `hypotheses[i]` against `references[i]` (one or more strings)."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference sets")
    m, variant = meteor(hypotheses, references)
    return TaskScores(bleu(hypotheses, references), rouge_l(hypotheses, references), m, variant, len(hypotheses))
