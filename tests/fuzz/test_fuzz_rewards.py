"""Fuzzing every reward parser and checker: rewards never crash a run.

Completions are built from the fragments hostile model output is made of (tags, ``\\boxed{``, braces, LaTeX,
huge or non-finite numbers, unicode digits, surrogates, NUL, box forms) and from long runs of one fragment (10,000
nested braces); ground truths of every answer type, with metadata (options, image sizes, coordinate spaces) that
may be absurd too. Properties, per case: the call returns a finite float in the reward's documented range or None,
never raises; it holds the time and memory bounds of `limits`; and no text reaches ``eval``/``exec`` (sympy's
``parse_expr``, which math-verify calls, evaluates a code string it builds: only number constructors and
arithmetic may be in it).
"""

from __future__ import annotations

import builtins
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fuzzing import fuzz_settings, limits
from hypothesis import given
from hypothesis import strategies as st

from vlrl.data.sample import PROBLEM_TYPES, Sample
from vlrl.rewards.accuracy import score_answer
from vlrl.rewards.boxes import COORD_SPACES, parse_boxes, scale_factors, to_pixel_box
from vlrl.rewards.choice import choice_score, options_of, parse_choice
from vlrl.rewards.extract import DEFAULT_MODES, answer_regions, extract_answer, without_thinking
from vlrl.rewards.format import lenient_format, single_answer, strict_format, tag_count
from vlrl.rewards.grounding import (
    GROUNDING_METRICS,
    average_precision,
    grounding_score,
    iou,
    vlmr1_detection_score,
)
from vlrl.rewards.length import repetition_penalty
from vlrl.rewards.mathcheck import has_absurd_number, is_number, math_equal, parse_config
from vlrl.rewards.numbers import numbers_match, parse_number
from vlrl.rewards.registry import RewardSpec, combine, list_rewards, reward_info
from vlrl.rewards.runner import RewardRunner
from vlrl.rewards.textmatch import anls, normalize_free_form, normalize_ocr, rouge_l_f1
from vlrl.rewards.user import UserRewardError, parse_target

MATH_TIMEOUT = 1.0  # math-verify's deadline per comparison in these cases (its own bound, under `limits`)

FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", "<ANSWER>", "\\boxed{", "\\boxed {", "\\fbox{", "{", "}",
    "\\{", "\\}", "\\frac{1}{0}", "\\frac{", "\\dfrac12", "\\sqrt{", "\\left(", "\\right)", "\\text{", "^{", "_",
    "1e999999", "1e-999999", "1e309", "2e400", "10**10**10", "9**9**9", "10^{10^{10}}", "9" * 120, "0" * 50,
    "NaN", "nan", "inf", "-inf", "Infinity", "\\infty", "∞", "0/0", "1/0", "-", "+", "/", "*", "=", "≈", "%", "\\%",
    "$", "$$", "\\(", "\\)", "\\[", "\\]", "```json\n", "```", "[", "]", "(", ")", ",", ".", ":", "<box>", "</box>",
    "<ref>", "</ref>", '{"bbox_2d": [', '"label": "cat"', "]}", "[1, 2, 3, 4]", "(1,2),(3,4)", "[nan, 0, 1, 2]",
    "[-5, -5, 1e308, 1e308]", "1", "0", "-5", "3.14", "1,000", "1 000,5", "50%", "١٢٣", "٣", "½", "²", "𝟕",
    "\ud800", "\udfff", "\x00", "\n", " ", "\t", "\u200b", "the answer is ", "The final answer is ", "Answer: ",
    "答案是", "答案：", "A", "B", "(C)", "D.", "Option C", "选 D", "yes", "No", "true", "是", "不", "x = ", "y=2x+1",
    "\\times 10^{", "\\cdot", "×", "°", "cm", "€", "__import__('os').system('true')", "().__class__", "lambda",
    "**", "\\\\", "I hope it is correct", "\\begin{pmatrix}", "\\end{pmatrix}", "&", "\\in", "(1, \\infty)",
]  # fmt: skip
_fragment = st.sampled_from(FRAGMENTS)
_number_text = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.fractions().map(str),
)
_piece = st.one_of(_fragment, _fragment, _number_text, st.text(max_size=8))


def _join(pieces: list[str]) -> str:
    return "".join(pieces)


def _repeat(args: tuple[str, int]) -> str:
    return args[0] * min(args[1], MAX_REPEAT_CHARS // len(args[0]))


MAX_REPEAT_CHARS = 1_000_000


mixed_text = st.lists(_piece, max_size=40).map(_join)
# one fragment many times (10,000 nested \boxed{ or braces, 1 MB of <think>), with mixed text on both sides
_few = st.integers(1, 12_000)
_many = st.one_of(_few, _few, _few, st.integers(12_000, 150_000))
long_text = st.tuples(mixed_text, st.tuples(_fragment, _many).map(_repeat), mixed_text).map(
    lambda t: t[0] + t[1] + t[2]
)
completions = st.one_of(mixed_text, mixed_text, long_text, st.text())

_coord = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**12), 10**12),
    st.sampled_from([0, 1, -1, 1e7, 1e308, -0.0, 5e-324]),
)


def _box_text(args: tuple[str, tuple[Any, Any, Any, Any]]) -> str:
    form, (a, b, c, d) = args
    return form.format(a=a, b=b, c=c, d=d)


BOX_FORMS = [
    "[{a}, {b}, {c}, {d}]",
    '{{"bbox_2d": [{a}, {b}, {c}, {d}], "label": "x"}}',
    '```json\n[{{"bbox": [{a}, {b}, {c}, {d}], "score": {a}}}]\n```',
    "<ref>x</ref><box>({a},{b}),({c},{d})</box>",
    "<box>[{a}, {b}, {c}, {d}]</box>",
    "({a}, {b}), ({c}, {d})",
]
box_text = st.tuples(st.sampled_from(BOX_FORMS), st.tuples(_coord, _coord, _coord, _coord)).map(_box_text)
box_answer = st.one_of(
    box_text,
    st.lists(box_text, min_size=1, max_size=4).map(", ".join).map(lambda s: f"[{s}]"),
    st.sampled_from(["[]", "none", "null", "", "[1, 2, 3]", "[[1, 2, 3, 4], [5, 6, 7, 8]]"]),
    mixed_text,
)
box_completion = st.one_of(
    completions,
    st.lists(st.one_of(box_text, _piece), max_size=12).map(_join),
    box_answer.map("<answer>{}</answer>".format),
)

_odd_value = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.sampled_from([10**400, -(10**400), -1, 0, "28", [], {}]),
)  # fmt: skip
grounding_metadata = st.fixed_dictionaries(
    {},
    optional={
        "coord_space": st.one_of(st.sampled_from(COORD_SPACES), st.text(max_size=5), st.none()),
        "image_size": st.one_of(st.lists(_odd_value, min_size=2, max_size=2), _odd_value),
        "factor": _odd_value,
        "min_pixels": _odd_value,
        "max_pixels": _odd_value,
    },
)
choice_metadata = st.fixed_dictionaries(
    {},
    optional={
        "options": st.one_of(
            st.lists(st.one_of(mixed_text, _number_text), max_size=30),
            st.dictionaries(
                st.one_of(st.sampled_from("ABCDabcd"), st.text(max_size=3)), mixed_text, max_size=6
            ),
            _odd_value,
        ),
        "answers": st.one_of(st.lists(mixed_text, max_size=4), _odd_value),
        "completion_length": _odd_value,
    },
)
# a ground truth of every answer type the rewards accept, with its metadata
ANSWERS: dict[str, Any] = {
    "multiple_choice": st.tuples(
        st.one_of(st.sampled_from(["A", "B", "(C)", "d"]), mixed_text), choice_metadata
    ),
    "numerical": st.tuples(st.one_of(_number_text, mixed_text), choice_metadata),
    "math": st.tuples(st.one_of(_number_text, mixed_text), choice_metadata),
    "yes_no": st.tuples(st.one_of(st.sampled_from(["yes", "no", "是", "否"]), mixed_text), choice_metadata),
    "ocr": st.tuples(mixed_text, choice_metadata),
    "free_form": st.tuples(mixed_text, choice_metadata),
    "grounding": st.tuples(box_answer, grounding_metadata),
}
FAST_TYPES = tuple(t for t in PROBLEM_TYPES if t not in ("math", "numerical"))


def typed_answer(types: tuple[str, ...]) -> st.SearchStrategy[tuple[str, str, dict[str, Any]]]:
    """(problem_type, answer, metadata) of one of `types`."""
    return st.sampled_from(types).flatmap(lambda t: ANSWERS[t].map(lambda am: (t, am[0], am[1])))


# ------------------------------------------------------------------------------------------------ nothing evaluated
# Untrusted text can reach eval only through sympy's parse_expr (math-verify hands it the digits and operators of a
# plain expression); there the evaluated code may use number constructors and arithmetic only. vlrl and the
# math libraries themselves never call eval/exec; other callers (imports, mpmath and dataclasses building code from
# their own templates) evaluate no input.
SYMPY_PARSER = "sympy.parsing.sympy_parser"
SYMPY_NUMBERS = frozenset(
    {"Integer", "Float", "Rational", "Add", "Mul", "Pow", "Symbol", "E", "I", "pi", "oo", "zoo", "nan"}
)
SYMPY_IMPORT = "from sympy import *"
NEVER_EVALUATE = ("vlrl", "math_verify", "latex2sympy2_extended")


def _refused(caller: str, code: Any, mode: str) -> bool:
    """True if `caller` (a module name) must not evaluate `code` (with `mode` "eval" or "exec")."""
    if caller.split(".")[0] in NEVER_EVALUATE:
        return True
    if caller != SYMPY_PARSER or (isinstance(code, str) and code == SYMPY_IMPORT):
        return False
    try:
        names = code.co_names if not isinstance(code, str) else compile(code, "<fuzz>", mode).co_names
    except SyntaxError:  # not Python (math-verify's \d takes any Unicode digit, ``٠``): runs nothing
        return False
    return not set(names) <= SYMPY_NUMBERS


@contextmanager
def nothing_evaluated() -> Iterator[list[str]]:
    """Replace builtins.eval/exec for the case: code that `_refused` refuses is recorded and not run (the call
    raises); the case fails if anything was recorded, even if the code under test swallowed the error."""
    refused: list[str] = []
    real_eval, real_exec = builtins.eval, builtins.exec

    def guard(real: Any, mode: str) -> Any:
        def call(code: Any, *args: Any, **kwargs: Any) -> Any:
            caller = str(sys._getframe(1).f_globals.get("__name__", ""))
            if _refused(caller, code, mode):
                refused.append(f"{caller}: {code!r:.200}")
                raise RuntimeError("fuzz: refused eval")
            return real(code, *args, **kwargs)

        return call

    builtins.eval, builtins.exec = guard(real_eval, "eval"), guard(real_exec, "exec")
    try:
        yield refused
    finally:
        builtins.eval, builtins.exec = real_eval, real_exec
    assert not refused, f"evaluated: {refused}"


def in_range(value: Any, lo: float = 0.0, hi: float = 1.0) -> bool:
    return value is None or (isinstance(value, float) and math.isfinite(value) and lo <= value <= hi)


# ------------------------------------------------------------------------------------------------ targets
@fuzz_settings(examples=100)
@given(completions, st.sampled_from([DEFAULT_MODES, ("boxed",), ("answer_is", "last_line"), ("answer_tag",)]))
def test_extract(text: str, modes: tuple[str, ...]) -> None:
    with limits("rewards.extract_answer"):
        found = extract_answer(text, modes)
        regions = answer_regions(text, modes)
        rest = without_thinking(text)
    assert found is None or (found and found == found.strip())
    assert all(isinstance(r, str) and r for r in regions) and len(regions) <= 2
    assert isinstance(rest, str)


@fuzz_settings(examples=150)
@given(st.one_of(completions, _number_text), st.one_of(completions, _number_text), st.booleans())
def test_numbers(a: str, b: str, strict: bool) -> None:
    with limits("rewards.parse_number"):
        pa, pb = parse_number(a, strict=strict), parse_number(b, strict=strict)
        for p in (pa, pb):
            assert p is None or p.value.is_finite()
        if pa is not None and pb is not None:
            assert isinstance(numbers_match(pa, pb, 0.05, 1e-9), bool)
        has_absurd_number(a)


@fuzz_settings(examples=150)
@given(completions, st.one_of(st.sampled_from(["A", "(B)", "c"]), mixed_text), choice_metadata)
def test_choice(text: str, gold: str, metadata: dict[str, Any]) -> None:
    # a region as accuracy passes it (at most max_answer_chars); whole long texts go through test_score_answer
    text = text[-4000:]
    with limits("rewards.choice"):
        options = options_of(metadata)
        letter = parse_choice(text, options)
        assert letter is None or (len(letter) == 1 and letter.isupper())
        assert in_range(choice_score([text], gold, options))


@fuzz_settings(examples=100)
@given(completions, st.one_of(completions, mixed_text), st.floats(0.0, 1.0))
def test_textmatch(a: str, b: str, threshold: float) -> None:
    with limits("rewards.textmatch"):
        a, b = a[:3000], b[:3000]  # accuracy caps the prediction at max_answer_chars before these
        assert in_range(anls(normalize_ocr(a), normalize_ocr(b), threshold))
        assert in_range(rouge_l_f1(a, b))
        normalize_free_form(a)


@fuzz_settings(examples=100)
@given(box_completion, box_answer, grounding_metadata, st.sampled_from(GROUNDING_METRICS), st.booleans())
def test_boxes_and_grounding(
    text: str, answer: str, metadata: dict[str, Any], metric: str, fix: bool
) -> None:
    with limits("rewards.boxes_grounding"):
        preds, gts = parse_boxes(text), parse_boxes(answer)
        assert len(preds) <= 100 and all(math.isfinite(c) for b in preds for c in (b.x1, b.y1, b.x2, b.y2))
        for space in COORD_SPACES:
            factors = scale_factors(space, metadata)
            assert factors is None or all(math.isfinite(f) and f > 0 for f in factors)
            if factors is not None:
                for box in preds[:5]:
                    to_pixel_box(box, factors, fix)
        for a in preds[:10]:
            for b in gts[:10]:
                assert in_range(iou(a, b))
        assert in_range(average_precision(preds, gts))
        assert in_range(vlmr1_detection_score(preds, gts))
        assert in_range(grounding_score(text, answer, metadata, metric=metric, fix_degenerate=fix))


@fuzz_settings(examples=100)
@given(completions, st.integers(1, 5))
def test_format_and_length(text: str, n: int) -> None:
    with limits("rewards.format_length"):
        for check in (strict_format, lenient_format, single_answer):
            assert isinstance(check(text), bool)
        assert tag_count(text) in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert tag_count(text, newlines=True) in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert in_range(repetition_penalty(text, n), -1.0, 0.0)


@fuzz_settings(examples=20)
@given(st.one_of(completions, _number_text), st.one_of(_number_text, mixed_text))
def test_mathcheck(prediction: str, gold: str) -> None:
    with limits("rewards.mathcheck"), nothing_evaluated():
        assert math_equal(prediction, gold, timeout=MATH_TIMEOUT) in (
            "equal",
            "different",
            "unparsed",
            "timeout",
        )
        assert isinstance(is_number(gold, timeout=MATH_TIMEOUT), bool)
        how, _ = parse_config(gold)
        assert how in ("as_is", "latex")


@fuzz_settings(examples=100)
@given(completions, typed_answer(FAST_TYPES), st.booleans())
def test_score_answer(text: str, typed: tuple[str, str, dict[str, Any]], extract: bool) -> None:
    problem_type, answer, metadata = typed
    with limits("rewards.score_answer"), nothing_evaluated():
        assert in_range(score_answer(text, answer, problem_type, metadata=metadata, extract=extract))


@fuzz_settings(examples=30)
@given(completions, typed_answer(("math", "numerical")), st.sampled_from([0.0, 0.05]))
def test_score_answer_math(text: str, typed: tuple[str, str, dict[str, Any]], rel_tol: float) -> None:
    problem_type, answer, metadata = typed
    with limits("rewards.score_answer_math"), nothing_evaluated():
        value = score_answer(
            text, answer, problem_type, metadata=metadata, rel_tol=rel_tol, math_timeout=MATH_TIMEOUT
        )
        assert in_range(value)


BUILT_IN = [n for n in list_rewards() if not n.startswith("judge")]
SPEC_OPTIONS = {
    "accuracy": {"math_timeout": MATH_TIMEOUT},
    "cosine": {"accuracy_kwargs": {"math_timeout": MATH_TIMEOUT}},
}


@fuzz_settings(examples=12)
@given(st.lists(st.tuples(completions, typed_answer(PROBLEM_TYPES)), min_size=1, max_size=4))
def test_registered_rewards_end_to_end(batch: list[tuple[str, tuple[str, str, dict[str, Any]]]]) -> None:
    """Every built-in reward (the judge rewards need a server: tests/rewards/test_rewards_judge.py) over one batch,
    as the trainer calls them: through `combine` and a `RewardRunner`, which counts a reward that raised."""
    texts = [c for c, _ in batch]
    samples = [Sample(id=str(i), images=[], messages=[], answer=a, problem_type=t, metadata=m)
               for i, (_, (t, a, m)) in enumerate(batch)]  # fmt: skip
    specs = [RewardSpec(n, 1.0, SPEC_OPTIONS.get(n, {})) for n in BUILT_IN]
    with (
        limits("rewards.registry_combine", seconds=60),
        nothing_evaluated(),
        RewardRunner(workers=0) as runner,
    ):
        total, per_reward, metrics = combine(specs, texts, samples, runner=runner)
    assert all(math.isfinite(t) for t in total)
    for spec in specs:
        lo, hi = reward_info(spec.name).value_range
        assert all(in_range(v, lo, hi) for v in per_reward[spec.key]), spec.name
        assert metrics[f"reward/{spec.key}/errors"] == 0, spec.name


_spec_piece = st.one_of(
    st.sampled_from(
        ["/", ".", "..", ":", "~", "~nosuchuser", ".py", "\x00", "\ud800", "os", "sys", "x", " ", "\\"]
    ),
    st.text(max_size=6),
)
_spelled_spec = st.tuples(
    st.sampled_from(["", "~/", "~nosuchuser/", "./", "../", "/abs/", "pkg.", "\x00/"]),
    st.lists(_spec_piece, max_size=4).map(_join),
    st.sampled_from(["", ".py", ".py/", ".PY"]),
    st.sampled_from([":", "::", ""]),
    st.one_of(st.sampled_from(["fn", "f1", "1f", "", "__import__", "a.b"]), st.text(max_size=4)),
).map(lambda parts: "".join(parts))


@fuzz_settings(examples=150)
@given(st.one_of(st.lists(_spec_piece, max_size=10).map(_join), _spelled_spec))
def test_user_reward_names(spec: str) -> None:
    """Reading a ``path.py:fn`` / ``module:fn`` name loads nothing: only the spelling is checked."""
    before = set(sys.modules)
    with limits("rewards.user_parse_target"), nothing_evaluated():
        try:
            target = parse_target(spec, cwd="/nonexistent")
        except UserRewardError as exc:
            assert repr(spec) in str(exc)
        else:
            assert target.function.isidentifier() and target.kind in ("file", "module")
    assert set(sys.modules) == before
