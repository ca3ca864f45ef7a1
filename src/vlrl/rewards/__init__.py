"""Rewards: answer extraction, accuracy by problem type, grounding IoU, format, length, repetition.

Every reward follows one protocol: ``fn(completions, samples, **kwargs) ->
list[float | None]``, None meaning "could not score" (counted, never a crash). Importing this package
registers the built-in rewards; it does not import torch or any model code (math-verify / sympy are
imported lazily on the first math comparison).

Built-in rewards and ranges: accuracy, iou, iou_hit, iou_mixed, det_ap, det_vlmr1, format,
format_lenient, answer_format, tag_count in [0, 1]; overlong and repetition in [-1, 0]; cosine in [-1, 1].
"""

from vlrl.rewards import format as _format  # noqa: F401  (registers the format rewards)
from vlrl.rewards.accuracy import accuracy_reward, score_answer
from vlrl.rewards.boxes import COORD_SPACES, Box, parse_boxes
from vlrl.rewards.choice import parse_choice
from vlrl.rewards.extract import DEFAULT_MODES, extract_answer
from vlrl.rewards.grounding import average_precision, grounding_score, iou, vlmr1_detection_score
from vlrl.rewards.length import cosine_scaled, overlong_penalty, repetition_penalty
from vlrl.rewards.registry import RewardSpec, combine, get_reward, list_rewards, register_reward, reward_info
from vlrl.rewards.runner import RewardRunner, RunResult
from vlrl.rewards.score import score_file

__all__ = [
    "COORD_SPACES",
    "DEFAULT_MODES",
    "Box",
    "RewardRunner",
    "RewardSpec",
    "RunResult",
    "accuracy_reward",
    "average_precision",
    "combine",
    "cosine_scaled",
    "extract_answer",
    "get_reward",
    "grounding_score",
    "iou",
    "list_rewards",
    "overlong_penalty",
    "parse_boxes",
    "parse_choice",
    "register_reward",
    "repetition_penalty",
    "reward_info",
    "score_answer",
    "score_file",
    "vlmr1_detection_score",
]
from vlrl.rewards import judge as _judge  # noqa: E402,F401  (registers judge, judge_process, judge_accuracy)
