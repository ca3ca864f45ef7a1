"""String similarity for OCR and free-form answers, without extra dependencies.

- `normalize_ocr`: lower case, whitespace runs collapsed to one space, stripped.
- `normalize_free_form`: SQuAD-style: lower case, punctuation removed (ASCII and Unicode P* classes),
  the articles a / an / the removed, whitespace collapsed.
- `levenshtein`: edit distance (insert / delete / substitute, cost 1) by Myers' bit-parallel
  algorithm (Myers 1999; Hyyrö 2001 formulation) on Python integers: O(len(a) * ceil(len(b)/64)) word ops.
- `anls`: ANLS of ST-VQA / DocVQA (Biten et al. 2019): NL = lev(p, g) / max(|p|, |g|);
  score = 1 - NL when NL < threshold (0.5), else 0. At NL == 0.5 exactly the score is 0 (paper definition).
  As lev(p, g) >= | |p| - |g| |, length ratios alone decide a 0 without computing the distance.
- `lcs_length`: longest common subsequence of two token lists by the bit-parallel algorithm of
  Allison & Dix (1986) / Hyyrö (2004).
- `rouge_l_f1`: ROUGE-L F1 on whitespace tokens of the normalised texts: P = LCS / |pred|,
  R = LCS / |ref|, F1 = 2PR / (P + R) (beta = 1), 0 when the LCS is 0.
"""

from __future__ import annotations

import re
import string
import unicodedata

_WS = re.compile(r"\s+")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_ASCII_PUNCT = set(string.punctuation)


def normalize_ocr(text: str) -> str:
    """Lower case, collapse whitespace, strip."""
    return _WS.sub(" ", text.lower()).strip()


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_free_form(text: str) -> str:
    """SQuAD-style normalisation: lower, drop punctuation and articles, collapse whitespace."""
    text = "".join(" " if _is_punct(ch) else ch for ch in text.lower())
    text = _ARTICLES.sub(" ", text)
    return _WS.sub(" ", text).strip()


def levenshtein(a: str, b: str) -> int:
    """Edit distance between `a` and `b` (bit-parallel, exact)."""
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq: dict[str, int] = {}
    for i, ch in enumerate(b):
        peq[ch] = peq.get(ch, 0) | (1 << i)
    mask = (1 << m) - 1
    last = 1 << (m - 1)
    pv, mv, score = mask, 0, m
    for ch in a:
        eq = peq.get(ch, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | ~(xh | pv)
        mh = pv & xh
        if ph & last:
            score += 1
        elif mh & last:
            score -= 1
        ph = ((ph << 1) | 1) & mask
        mh = (mh << 1) & mask
        pv = (mh | ~(xv | ph)) & mask
        mv = ph & xv
    return score


def anls(prediction: str, gold: str, threshold: float = 0.5) -> float:
    """ANLS similarity of two already-normalised strings (see module doc)."""
    longest = max(len(prediction), len(gold))
    if longest == 0:
        return 1.0
    if abs(len(prediction) - len(gold)) / longest >= threshold:
        return 0.0
    nl = levenshtein(prediction, gold) / longest
    return 1.0 - nl if nl < threshold else 0.0


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of token lists `a` and `b` (bit-parallel, exact)."""
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return 0
    peq: dict[str, int] = {}
    for i, tok in enumerate(b):
        peq[tok] = peq.get(tok, 0) | (1 << i)
    mask = (1 << m) - 1
    v = mask
    for tok in a:
        u = v & peq.get(tok, 0)
        v = ((v + u) | (v - u)) & mask
    return m - bin(v).count("1")


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between two texts after `normalize_free_form` (see module doc)."""
    pred = normalize_free_form(prediction).split()
    ref = normalize_free_form(reference).split()
    if not pred or not ref:
        return 1.0 if not pred and not ref else 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)
