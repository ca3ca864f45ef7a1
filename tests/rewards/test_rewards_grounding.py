"""Box parsing, coordinate spaces (with a hand-computed smart_resize), IoU, AP@0.5, VLM-R1 score."""

from __future__ import annotations

import math

import pytest

from vlrl.data.sample import Sample
from vlrl.rewards.boxes import MAX_COORD, Box, parse_boxes, scale_factors
from vlrl.rewards.grounding import average_precision, grounding_score, iou, vlmr1_detection_score
from vlrl.rewards.registry import get_reward


def _coords(boxes: list[Box]) -> list[tuple[float, float, float, float]]:
    return [(b.x1, b.y1, b.x2, b.y2) for b in boxes]


@pytest.mark.parametrize(
    "text",
    [
        '{"bbox_2d": [1, 2, 3, 4], "label": "cat"}',
        '[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}]',
        'Here:\n```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}]\n```',
        'I see {"bbox_2d": [1, 2, 3, 4], "label": "cat"} there',
        "<ref>cat</ref><box>(1,2),(3,4)</box>",
        "<box>[1, 2, 3, 4]</box>",
        "from (1, 2), (3, 4)",
        "the box is [1, 2, 3, 4].",
        "[1.0, 2.0, 3.0, 4.0]",
    ],
)
def test_parse_box_forms(text: str) -> None:
    boxes = parse_boxes(text)
    assert _coords(boxes) == [(1.0, 2.0, 3.0, 4.0)]



@pytest.mark.parametrize("form", ['{{"bbox_2d": [{c}, 2, 3, 4]}}', "<box>{c} 2 3 4</box>", "({c}, 2), (3, 4)",
                                  "[{c}, 2, 3, 4]"])
def test_coordinates_beyond_max_coord_are_no_box_in_every_form(form: str) -> None:
    """Every written form obeys the same bound (`MAX_COORD`): at it a box, past it none."""
    assert _coords(parse_boxes(form.format(c=int(MAX_COORD)))) == [(MAX_COORD, 2.0, 3.0, 4.0)]
    assert parse_boxes(form.format(c=int(MAX_COORD) + 1)) == []

def test_parse_labels_lists_and_last_fence() -> None:
    text = '```json\n[{"bbox_2d": [0,0,1,1]}]\n```\nfinal:\n```json\n[{"bbox_2d": [0,0,10,10], "label": "cat"},' \
        ' {"bbox_2d": [20,20,30,30], "label": "dog", "score": 0.5}]\n```'  # fmt: skip
    boxes = parse_boxes(text)
    assert [b.label for b in boxes] == ["cat", "dog"] and boxes[1].score == 0.5
    assert _coords(parse_boxes("[[1,2,3,4],[5,6,7,8]]")) == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert parse_boxes('{"bbox_2d": [1, 2, 3]}') == []
    assert parse_boxes('[{"bbox_2d": [1, 2, 3, NaN]}]') == []
    assert parse_boxes("no box here") == []


def test_iou_hand_values() -> None:
    a = Box(0, 0, 10, 10)
    assert iou(a, a) == 1.0
    assert iou(a, Box(5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert iou(a, Box(0, 0, 10, 20)) == pytest.approx(0.5)
    assert iou(a, Box(10, 0, 20, 10)) == 0.0  # touching edges
    assert iou(Box(0, 0, 0, 0), Box(0, 0, 0, 0)) == 0.0


GT = "[100, 50, 500, 250]"  # pixels of a 1000 x 500 (w x h) image


@pytest.mark.parametrize(
    ("prediction", "meta"),
    [
        ("[100, 50, 500, 250]", {}),
        ("[100, 50, 500, 250]", {"coord_space": "pixel"}),
        ("[100, 100, 500, 500]", {"coord_space": "norm1000", "image_size": [1000, 500]}),
        ("[0.1, 0.1, 0.5, 0.5]", {"coord_space": "norm1", "image_size": [1000, 500]}),
        # smart_resize(500, 1000) with defaults: round(500/28)=18 -> 504, round(1000/28)=36 -> 1008
        ("[100.8, 50.4, 504, 252]", {"coord_space": "resized", "image_size": [1000, 500]}),
        # max_pixels = 200704: beta = sqrt(500000 / 200704) = 1.5784; h = floor(500 / 1.5784 / 28) * 28 = 308,
        # w = floor(1000 / 1.5784 / 28) * 28 = 616 -> x * 1000/616, y * 500/308
        (
            "[61.6, 30.8, 308, 154]",
            {"coord_space": "resized", "image_size": [1000, 500], "max_pixels": 200704},
        ),
    ],
)
def test_coordinate_spaces_give_iou_one(prediction: str, meta: dict[str, object]) -> None:
    assert grounding_score(f"<answer>{prediction}</answer>", GT, meta, metric="iou") == pytest.approx(1.0)


def test_resized_factors_hand_computed() -> None:
    assert scale_factors("resized", {"image_size": [1000, 500]}) == (1000 / 1008, 500 / 504)
    # upscale branch: 30 x 20 image, min_pixels 3136: beta = sqrt(3136 / 600); h = ceil(20 b / 28) * 28 = 56,
    # w = ceil(30 b / 28) * 28 = 84
    assert scale_factors("resized", {"image_size": [30, 20]}) == (30 / 84, 20 / 56)
    # Qwen3-VL factor 32: ceil(20 b / 32) * 32 = 64, ceil(30 b / 32) * 32 = 96
    assert scale_factors("resized", {"image_size": [30, 20], "factor": 32}) == (30 / 96, 20 / 64)
    assert scale_factors("norm1000", {}) is None


def test_single_box_metrics() -> None:
    pred = "<answer>[5, 5, 15, 15]</answer>"
    gt = "[0, 0, 10, 10]"
    assert grounding_score(pred, gt, {}, metric="iou") == pytest.approx(1 / 7)
    assert grounding_score(pred, gt, {}, metric="hit") == 0.0
    assert grounding_score(pred, gt, {}, metric="mixed", alpha=0.5) == pytest.approx(0.5 / 7)
    half = "<answer>[0, 0, 10, 20]</answer>"  # IoU exactly 0.5: a hit (>=)
    assert grounding_score(half, gt, {}, metric="hit") == 1.0
    assert grounding_score(half, gt, {}, metric="mixed", alpha=0.7) == pytest.approx(0.7 + 0.3 * 0.5)
    assert grounding_score(half, gt, {}, metric="hit", iou_threshold=0.75) == 0.0
    # first box of the answer counts; whole-text fallback uses the last box
    assert grounding_score("<answer>[0,0,10,10] [50,50,60,60]</answer>", gt, {}) == 1.0
    assert grounding_score("guess [50,50,60,60] then [0,0,10,10]", gt, {}) == 0.0  # last line: first box
    assert grounding_score("guess [50,50,60,60] then [0,0,10,10]\n(done)", gt, {}) == 1.0
    assert grounding_score("<answer>none</answer>", gt, {}) == 0.0


def test_degenerate_boxes_and_unscorable_items() -> None:
    gt = "[0, 0, 10, 10]"
    assert grounding_score("<answer>[10, 10, 0, 0]</answer>", gt, {}, metric="iou") == 1.0  # swapped
    assert (
        grounding_score("<answer>[10, 10, 0, 0]</answer>", gt, {}, metric="iou", fix_degenerate=False) == 0.0
    )
    assert grounding_score("[0,0,10,10]", "not a box", {}) is None
    assert grounding_score("[0,0,10,10]", gt, {"coord_space": "norm1000"}) is None  # no image_size
    assert grounding_score("[0,0,10,10]", gt, {"coord_space": "polar"}) is None
    assert grounding_score("<answer>[]</answer>", "[]", {}) == 1.0  # no object, none predicted
    assert grounding_score("<answer>[1,1,2,2]</answer>", "[]", {}) == 0.0


CAT, DOG = Box(0, 0, 10, 10, "cat"), Box(20, 20, 30, 30, "dog")


def test_average_precision_two_labelled_boxes() -> None:
    assert average_precision([CAT, DOG], [CAT, DOG]) == 1.0
    miss = Box(50, 50, 60, 60, "dog")
    assert average_precision([CAT, miss], [CAT, DOG]) == pytest.approx(0.5)  # AP cat 1, dog 0
    # dog: FP then TP -> precisions 0, 1/2; AP = 1/2; mean with cat 1 -> 0.75
    assert average_precision([miss, DOG, CAT], [CAT, DOG]) == pytest.approx(0.75)
    scored = [Box(50, 50, 60, 60, "dog", 0.1), Box(20, 20, 30, 30, "dog", 0.9), CAT]
    assert average_precision(scored, [CAT, DOG]) == pytest.approx(1.0)  # ranked by score
    wrong_label = Box(0, 0, 10, 10, "dog")
    assert average_precision([wrong_label], [CAT]) == 0.0
    assert average_precision([Box(0, 0, 10, 10)], [Box(0, 0, 10, 10)]) == 1.0  # unlabelled ground truth
    assert average_precision([], []) == 1.0 and average_precision([CAT], []) == 0.0


def test_vlmr1_score_hand_value() -> None:
    preds = [CAT, Box(20, 20, 30, 40, "dog"), Box(50, 50, 60, 60, "bird")]  # IoUs 1, 0.5, unmatched
    # position = (1 + 0.5) / 2 = 0.75; completeness = 1 - (0/2 + 1/3) / 2 = 5/6
    expected = (0.7 * 0.75 + 0.3 * 5 / 6) / 1.0
    assert vlmr1_detection_score(preds, [CAT, DOG]) == pytest.approx(expected)
    # a matched box with the wrong label counts IoU 0 but is matched
    assert vlmr1_detection_score([Box(0, 0, 10, 10, "dog")], [CAT]) == pytest.approx(0.3)
    assert vlmr1_detection_score([], [CAT]) == 0.0 and vlmr1_detection_score([], []) == 1.0


def test_multi_box_grounding_through_score_and_rewards() -> None:
    gt = '[{"bbox_2d": [0,0,10,10], "label": "cat"}, {"bbox_2d": [20,20,30,30], "label": "dog"}]'
    pred = '<answer>```json\n[{"bbox_2d": [0,0,10,10], "label": "cat"}, {"bbox_2d": [50,50,60,60], "label": "dog"}]\n```</answer>'
    assert grounding_score(pred, gt, {}) == pytest.approx(0.5)  # several gt boxes: AP
    vl = grounding_score(pred, gt, {}, multi_box_metric="vlmr1")
    assert vl == pytest.approx(0.7 * 0.5 + 0.3 * (1 - (0.5 + 0.5) / 2))
    sample = Sample(id="g", images=[], messages=[], answer=gt, problem_type="grounding")
    other = Sample(id="n", images=[], messages=[], answer="3", problem_type="numerical")
    assert get_reward("det_ap")([pred, "3"], [sample, other]) == [pytest.approx(0.5), None]
    single = Sample(id="s", images=[], messages=[], answer="[0,0,10,10]", problem_type="grounding")
    values = [get_reward(n)(["[5,5,15,15]"], [single])[0] for n in ("iou", "iou_hit", "iou_mixed")]
    assert values == [pytest.approx(1 / 7), 0.0, pytest.approx(0.5 / 7)]
    assert math.isclose(get_reward("det_vlmr1")(["[0,0,10,10]"], [single])[0] or 0.0, 1.0)


@pytest.mark.parametrize(
    "metadata",
    [
        {"coord_space": "norm1", "image_size": [float("inf"), 100]},  # inf (JSON Infinity)
        {"coord_space": "norm1000", "image_size": [10**400, 100]},  # too large for a float
        {"coord_space": "resized", "image_size": [10**300, 10**300]},  # smart_resize overflows
        {"coord_space": "resized", "image_size": [True, 100]},  # a bool is no size
        {"coord_space": "resized", "image_size": [100, 100], "factor": "x"},
        {"coord_space": "resized", "image_size": [100, 100], "factor": 0},
        {"coord_space": "resized", "image_size": [100, 100], "max_pixels": 0},
        {"coord_space": "resized", "image_size": [100, 100], "min_pixels": [1]},
    ],
)
def test_absurd_grounding_metadata_is_unscorable_not_an_exception(metadata: dict[str, object]) -> None:
    """Found by tests/fuzz/test_fuzz_rewards.py: metadata the coordinate mapping cannot use raised
    (OverflowError, ValueError, ZeroDivisionError) out of the reward instead of giving None."""
    assert scale_factors(str(metadata["coord_space"]), metadata) is None
    assert grounding_score("[1, 2, 3, 4]", "[1, 2, 3, 4]", metadata) is None
