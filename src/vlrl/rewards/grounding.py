"""Grounding rewards: IoU of predicted boxes against ground-truth boxes in original-image pixels.

The ground truth (`Sample.answer`) holds the box(es) in pixel space of the original image, in any form
`vlrl.rewards.boxes.parse_boxes` reads (``[x1, y1, x2, y2]``, JSON with labels, ...); ``[]`` or ``None``
means "no object" (then a prediction without boxes scores 1, any box 0). The prediction's coordinate
space is ``metadata["coord_space"]`` (default "pixel"; see `vlrl.rewards.boxes` for "resized",
"norm1000", "norm1", which need ``metadata["image_size"] = [w, h]``).

Boxes are read from the extracted answer (`extract_answer`); if that holds none, from the whole
completion. IoU is the continuous-coordinate one (areas (x2 - x1) * (y2 - y1), no +1 pixel convention).

One ground-truth box (referring expressions) and ``metric``:

- ``"iou"``: IoU of the predicted box with the ground truth, in [0, 1];
- ``"hit"`` (default, the usual REC accuracy): 1[IoU >= iou_threshold];
- ``"mixed"``: alpha * 1[IoU >= iou_threshold] + (1 - alpha) * IoU.

The predicted box is the FIRST box of the extracted answer (as VLM-R1's REC reward), or the LAST box
of the whole completion when read from it (the final answer comes last). No predicted box scores 0.

Several ground-truth boxes (or ``metric`` "ap" / "vlmr1"), with ``multi_box_metric``:

- ``"ap"``: detection-style AP at ``iou_threshold``, averaged over the ground-truth labels (mAP).
  Per label: predictions in decreasing ``score`` (given order when there is none), each matched to the
  unmatched same-label ground truth of highest IoU >= threshold (true positive) or else a false
  positive; AP is the all-point interpolated area under precision-recall (PASCAL VOC 2010+):
  sum over true positives of (1 / n_gt) * max precision at this or any later rank. Labels are compared
  lower-cased and stripped, and only when the ground truth has labels; predicted labels absent from
  the ground truth are ignored (COCO convention).
- ``"vlmr1"``: VLM-R1's ``detection_score`` (om-ai-lab/VLM-R1, open_r1 grpo_jsonl.py): greedy matching
  of (prediction, ground truth) pairs by decreasing IoU, ignoring labels, stopping below
  ``iou_threshold``; a matched pair with a different label counts IoU 0. With n_gt ground truths,
  n_pred predictions and unmatched counts u_gt, u_pred:
  position = sum(matched IoU) / n_gt; label = (#matched with the same label) / n_gt;
  completeness = 1 - (u_gt / n_gt + u_pred / n_pred) / 2;
  score = (0.7 * position + 0.0 * label + 0.3 * completeness) / (0.7 + 0.0 + 0.3)
  (weights ``vlmr1_weights``); no ground truth: 1 if no prediction else 0; no prediction: 0.
  The extra-prediction penalty is the u_pred / n_pred term. VLM-R1's own IoU uses a +1 pixel
  convention; here the continuous IoU is used.

Registered rewards (non-grounding samples give None): ``iou``, ``iou_hit``, ``iou_mixed``, ``det_ap``,
``det_vlmr1``; all in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vlrl.rewards.boxes import COORD_SPACES, Box, fix_box, parse_boxes, scale_factors, to_pixel_box
from vlrl.rewards.extract import DEFAULT_MODES, extract_answer
from vlrl.rewards.registry import register_reward

if TYPE_CHECKING:
    from vlrl.data.sample import Sample

GROUNDING_METRICS = ("hit", "iou", "mixed", "ap", "vlmr1")
MULTI_BOX_METRICS = ("ap", "vlmr1")
_NO_OBJECT = {"", "[]", "none", "null"}


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (continuous coordinates); 0 when the union is empty."""
    iw = min(a.x2, b.x2) - max(a.x1, b.x1)
    ih = min(a.y2, b.y2) - max(a.y1, b.y1)
    inter = iw * ih if iw > 0 and ih > 0 else 0.0
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def _label(box: Box) -> str:
    return (box.label or "").strip().lower()


def average_precision(preds: Sequence[Box], gts: Sequence[Box], iou_threshold: float = 0.5) -> float:
    """Detection AP at `iou_threshold`, mean over ground-truth labels (see module doc)."""
    if not gts:
        return 1.0 if not preds else 0.0
    use_labels = any(g.label for g in gts)
    labels = sorted({_label(g) for g in gts}) if use_labels else [""]
    aps = []
    for lab in labels:
        golds = [g for g in gts if not use_labels or _label(g) == lab]
        cands = [p for p in preds if not use_labels or _label(p) == lab]
        cands = sorted(cands, key=lambda p: -(p.score if p.score is not None else 0.0))  # stable
        matched = [False] * len(golds)
        precisions: list[float] = []
        hits: list[bool] = []
        tp = 0
        for rank, box in enumerate(cands, start=1):
            best_j, best = -1, iou_threshold
            for j, gold in enumerate(golds):
                v = iou(box, gold)
                if not matched[j] and v >= best:
                    best_j, best = j, v
            if best_j >= 0:
                matched[best_j] = True
                tp += 1
            hits.append(best_j >= 0)
            precisions.append(tp / rank)
        ap, running = 0.0, 0.0
        for hit, precision in zip(reversed(hits), reversed(precisions)):
            running = max(running, precision)
            if hit:
                ap += running / len(golds)
        aps.append(ap)
    return sum(aps) / len(aps)


def vlmr1_detection_score(
    preds: Sequence[Box],
    gts: Sequence[Box],
    iou_threshold: float = 0.5,
    weights: tuple[float, float, float] = (0.7, 0.0, 0.3),
) -> float:
    """VLM-R1's detection score (greedy IoU matching, position / label / completeness); see module doc."""
    if not gts:
        return 1.0 if not preds else 0.0
    if not preds:
        return 0.0
    pairs = sorted(
        ((iou(p, g), i, j) for i, p in enumerate(preds) for j, g in enumerate(gts)),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    used_p: set[int] = set()
    used_g: set[int] = set()
    position = label_score = 0.0
    for value, i, j in pairs:
        if value < iou_threshold:
            break
        if i in used_p or j in used_g:
            continue
        used_p.add(i)
        used_g.add(j)
        same = _label(preds[i]) == _label(gts[j])
        position += value if same else 0.0
        label_score += 1.0 if same else 0.0
    n_gt, n_pred = len(gts), len(preds)
    completeness = 1.0 - ((n_gt - len(used_g)) / n_gt + (n_pred - len(used_p)) / n_pred) / 2.0
    alpha, beta, gamma = weights
    return (alpha * position / n_gt + beta * label_score / n_gt + gamma * completeness) / (
        alpha + beta + gamma
    )


def _gold_boxes(answer: str, fix_degenerate: bool) -> list[Box] | None:
    if answer.strip().lower() in _NO_OBJECT:
        return []
    boxes = [fix_box(b, fix_degenerate) for b in parse_boxes(answer)]
    good = [b for b in boxes if b is not None]
    return good or None


def predicted_boxes(
    text: str, *, extract: bool = True, modes: Sequence[str] = DEFAULT_MODES
) -> tuple[list[Box], bool]:
    """(boxes as written, read_from_whole_text): from the extracted answer, else from the whole text."""
    if extract:
        answer = extract_answer(text, modes)
        boxes = parse_boxes(answer) if answer else []
        if boxes:
            return boxes, False
    return parse_boxes(text), True


def grounding_score(
    prediction_text: str,
    answer: str,
    metadata: dict[str, Any],
    *,
    extract: bool = True,
    modes: Sequence[str] = DEFAULT_MODES,
    metric: str = "hit",
    multi_box_metric: str = "ap",
    iou_threshold: float = 0.5,
    alpha: float = 0.5,
    fix_degenerate: bool = True,
    vlmr1_weights: tuple[float, float, float] = (0.7, 0.0, 0.3),
) -> float | None:
    """Score of the predicted box(es) against `answer` (pixels of the original image); see module doc."""
    if metric not in GROUNDING_METRICS or multi_box_metric not in MULTI_BOX_METRICS:
        raise ValueError(
            f"metric must be one of {GROUNDING_METRICS}, multi_box_metric one of {MULTI_BOX_METRICS}"
        )
    coord_space = str(metadata.get("coord_space") or "pixel")
    factors = scale_factors(coord_space, metadata) if coord_space in COORD_SPACES else None
    gts = _gold_boxes(answer, fix_degenerate)
    if factors is None or gts is None:
        return None
    raw, whole_text = predicted_boxes(prediction_text, extract=extract, modes=modes)
    preds = [b for b in (to_pixel_box(r, factors, fix_degenerate) for r in raw) if b is not None]
    if not gts:
        return 1.0 if not preds else 0.0
    chosen = metric if metric in MULTI_BOX_METRICS else multi_box_metric if len(gts) > 1 else metric
    if chosen == "ap":
        return average_precision(preds, gts, iou_threshold)
    if chosen == "vlmr1":
        return vlmr1_detection_score(preds, gts, iou_threshold, vlmr1_weights)
    if not preds:
        return 0.0
    value = iou(preds[-1] if whole_text else preds[0], gts[0])
    hit = 1.0 if value >= iou_threshold else 0.0
    if chosen == "iou":
        return value
    if chosen == "hit":
        return hit
    return alpha * hit + (1.0 - alpha) * value


def _grounding_reward(
    completions: list[str], samples: list[Sample], metric: str, options: dict[str, Any]
) -> list[float | None]:
    return [
        grounding_score(c, s.answer, s.metadata, metric=metric, **options)
        if s.problem_type == "grounding"
        else None
        for c, s in zip(completions, samples, strict=True)
    ]


_OPTION_NAMES = frozenset(
    {"extract", "modes", "multi_box_metric", "iou_threshold", "alpha", "fix_degenerate", "vlmr1_weights"}
)


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in _OPTION_NAMES}


@register_reward("iou", params=_OPTION_NAMES)
def iou_reward(completions: list[str], samples: list[Sample], **kwargs: Any) -> list[float | None]:
    """Continuous IoU of the predicted box (multi-box ground truth: `multi_box_metric`)."""
    return _grounding_reward(completions, samples, "iou", _options(kwargs))


@register_reward("iou_hit", params=_OPTION_NAMES)
def iou_hit_reward(completions: list[str], samples: list[Sample], **kwargs: Any) -> list[float | None]:
    """1[IoU >= iou_threshold] (multi-box ground truth: `multi_box_metric`)."""
    return _grounding_reward(completions, samples, "hit", _options(kwargs))


@register_reward("iou_mixed", params=_OPTION_NAMES)
def iou_mixed_reward(completions: list[str], samples: list[Sample], **kwargs: Any) -> list[float | None]:
    """alpha * 1[IoU >= iou_threshold] + (1 - alpha) * IoU (multi-box ground truth: `multi_box_metric`)."""
    return _grounding_reward(completions, samples, "mixed", _options(kwargs))


@register_reward("det_ap", params=_OPTION_NAMES)
def det_ap_reward(completions: list[str], samples: list[Sample], **kwargs: Any) -> list[float | None]:
    """Detection AP at iou_threshold, mean over labels."""
    return _grounding_reward(completions, samples, "ap", _options(kwargs))


@register_reward("det_vlmr1", params=_OPTION_NAMES)
def det_vlmr1_reward(completions: list[str], samples: list[Sample], **kwargs: Any) -> list[float | None]:
    """VLM-R1's detection score (position / label / completeness)."""
    return _grounding_reward(completions, samples, "vlmr1", _options(kwargs))
