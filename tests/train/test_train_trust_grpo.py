"""Trust-GRPO in the RL loop: the judge stage against a fake OpenAI-compatible endpoint that counts requests
(only groups neither all right nor all wrong are judged; gamma and the annealed weight by hand; a judge that
is down costs no crash), then the tiny model trained for 10 steps with the SFT model served by `vlrl serve`
as its judge, and a run whose judge server is SIGKILLed mid-run and still finishes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from serve_helpers import Served, free_port, start_server

from vlrl import recipes_dir
from vlrl.config import load_config
from vlrl.data.sample import Sample
from vlrl.models.inputs import Encoded
from vlrl.rewards.judge import FAILURE_KINDS, JudgeConfig
from vlrl.rollout import Completion, Group
from vlrl.train.logging import read_metrics
from vlrl.train.rl import RLConfig, run_rl
from vlrl.train.rl_rollout import StepRollouts
from vlrl.train.sft import SFTConfig, run_sft
from vlrl.train.trust import PROCESS_KEY, TrustConfig, TrustStage

RECIPE = recipes_dir() / "tiny-trust-grpo.yaml"
G = 4


# ------------------------------------------------------------------------------------ the judge stage
class FakeJudge:
    """An OpenAI-compatible /v1/chat/completions on loopback that counts requests. It scores the reasoning of
    a response holding the right answer "<answer>1</answer>" 0.2 and any other 0.8 (a judge that disagrees
    with the outcomes, so gamma < 1)."""

    def __init__(self) -> None:
        self.requests = 0
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests += 1
                text = body["messages"][-1]["content"][0]["text"]
                score = "0.2" if "<answer>1</answer>" in text.split("Reasoning process:")[-1] else "0.8"
                message = {"role": "assistant", "content": f"<answer>{score}</answer>"}
                reply = json.dumps({"choices": [{"message": message}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_judge() -> Iterator[FakeJudge]:
    judge = FakeJudge()
    yield judge
    judge.close()


def _rollouts(answers: list[list[str]]) -> StepRollouts:
    """Groups of completions "<answer>a</answer>" to questions whose answer is 1; accuracy as the reward."""
    groups, acc = [], []
    for gi, group in enumerate(answers):
        sample = Sample(id=f"q{gi}", images=[], messages=[{"role": "user", "content": f"question {gi}"}],
                        answer="1", problem_type="numerical")
        comps = [Completion(torch.tensor([5, 6]), f"<answer>{a}</answer>", torch.zeros(2), truncated=False)
                 for a in group]
        groups.append(Group(sample, Encoded(torch.tensor([1, 2]), None, None, None), comps))
        acc += [1.0 if a == "1" else 0.0 for a in group]
    scores = torch.tensor(acc, dtype=torch.float64)
    per: dict[str, list[float | None]] = {"accuracy": list(acc)}
    return StepRollouts(groups, list(range(len(groups))), len(groups), scores, per)


def _stage(url: str, **judge: object) -> TrustStage:
    settings: dict = dict(base_url=url, model="judge", timeout=60.0, max_retries=0, backoff=0.01,
                          max_concurrency=1)
    settings.update(judge)
    cfg = TrustConfig(enabled=True, alpha=0.3, anneal_steps=10.0, judge=JudgeConfig(**settings))
    return TrustStage(cfg, G)


def test_uniform_groups_make_no_judge_call(fake_judge: FakeJudge) -> None:
    stage = _stage(fake_judge.url)
    try:
        flat = _rollouts([["1"] * G, ["2", "3", "2", "0"]])  # all right, all wrong
        m = stage.apply(flat, step=1)
        assert fake_judge.requests == 0
        assert m["trust/judge_calls"] == m["trust/judge_requests"] == m["trust/frac_groups_sent"] == 0
        assert flat.scores.tolist() == [1.0] * G + [0.0] * G  # outcome rewards unchanged
        assert flat.per_reward[PROCESS_KEY] == [None] * (2 * G)
        assert m["trust/gamma_mean"] == 1.0 and m["trust/frac_groups_judged"] == 0.0
        mixed = _rollouts([["1"] * G, ["1", "2", "1", "3"], ["0"] * G])
        m = stage.apply(mixed, step=3)
        # only the mixed group is sent; its repeated "<answer>1</answer>" is answered from the cache
        assert fake_judge.requests == m["trust/judge_calls"] == 3
        assert m["trust/judge_requests"] == G and m["trust/cache_hits"] == 1
        assert m["trust/frac_groups_sent"] == pytest.approx(1 / 3)
        # by hand: mu_c = 0.2 (right answers), mu_w = 0.8, gamma = exp(-0.6); weight = 0.3 * exp(-3 / 10)
        gamma, weight = math.exp(0.2 - 0.8), 0.3 * math.exp(-0.3)
        assert m["trust/weight"] == pytest.approx(weight)
        assert m["trust/gamma_mean"] == pytest.approx(gamma)
        assert m["trust/frac_gamma_lt_1"] == pytest.approx(1 / 3)
        expected = [1.0 + gamma * weight * 0.2, gamma * weight * 0.8] * 2
        assert mixed.scores[G : 2 * G].tolist() == pytest.approx(expected)
        assert mixed.scores[:G].tolist() == [1.0] * G and mixed.scores[2 * G :].tolist() == [0.0] * G
        assert mixed.per_reward[PROCESS_KEY][G : 2 * G] == pytest.approx([0.2, 0.8, 0.2, 0.8])
        again = _rollouts([["1"] * G, ["1", "2", "1", "3"]])
        m = stage.apply(again, step=4)  # same question, same completions: all from the cache
        assert fake_judge.requests == 3 and m["trust/cache_hits"] == G and m["trust/judge_calls"] == 0
    finally:
        stage.close()


def test_judge_down_counts_failures_and_keeps_outcome_rewards() -> None:
    stage = _stage(f"http://127.0.0.1:{free_port()}/v1", max_retries=1)  # nothing listens there
    try:
        roll = _rollouts([["1", "2", "1", "3"]])
        m = stage.apply(roll, step=1)
        assert m["trust/judge_failures"] == m["trust/judge_no_reply"] == G
        assert m["trust/judge_calls"] == 2 * G and m["trust/judge_retries"] == G  # one retry per completion
        # every no-reply failure under its cause: nothing listens, so each is a connection error
        causes = {k: v for k, v in m.items() if k.startswith("trust/judge_") and k.removeprefix("trust/judge_")
                  in FAILURE_KINDS}
        assert len(causes) == len(FAILURE_KINDS) and sum(causes.values()) == m["trust/judge_no_reply"]
        assert m["trust/judge_connection_errors"] == G
        assert roll.scores.tolist() == [1.0, 0.0, 1.0, 0.0]
        assert m["trust/frac_groups_sent"] == 1.0 and m["trust/frac_groups_judged"] == 0.0
    finally:
        stage.close()


# ------------------------------------------------------------------------------ the tiny model, served judge
@pytest.fixture(scope="module")
def sft_model(tiny_model_dir: Path, synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 SFT steps: the policy learns `<answer>N</answer>` and is sometimes right, so outcomes vary within
    groups; served as the judge, the same model answers "<answer>N</answer>", which the parser reads (clipped
    to 1.0)."""
    cfg = SFTConfig(model=str(tiny_model_dir), data=[str(synth_dir / "counting" / "train.jsonl")],
                    out=str(tmp_path_factory.mktemp("trust-sft")), max_steps=30, batch_size=8,
                    micro_batch_size=8, lr=3e-3, warmup_steps=2, save_every=100, log_every=5, threads=1)
    before = torch.get_num_threads()
    try:
        return run_sft(cfg)
    finally:
        torch.set_num_threads(before)


def _overrides(model: Path, data: Path, out: Path, judge_url: str, steps: int) -> list[str]:
    kw = {"model": model, "data": f"[{data / 'counting' / 'train.jsonl'}]", "validation.data": "[]", "out": out,
          "max_steps": steps, "rollout.batch_size": 2, "rollout.group_size": G, "rollout.max_new_tokens": 8,
          "logging.save_every": 100, "algorithm.beta": 0.0, "threads": 1, "trust.anneal_steps": 5, "trust.judge.base_url": judge_url,
          "trust.judge.model": "tiny", "trust.judge.timeout": 60.0, "trust.judge.max_retries": 1,
          "trust.judge.backoff": 0.05, "trust.judge.max_concurrency": 1}
    return [f"{k}={v}" for k, v in kw.items()]


@pytest.mark.slow
def test_trust_grpo_trains_against_served_judge(sft_model: Path, synth_dir: Path, tmp_path: Path) -> None:
    server = start_server(sft_model, tmp_path / "server.log")
    before_threads = torch.get_num_threads()
    try:
        overrides = _overrides(sft_model, synth_dir, tmp_path / "run", server.url + "/v1", 10)
        cfg = load_config(RLConfig, RECIPE, overrides)
        final = run_rl(cfg)
    finally:
        torch.set_num_threads(before_threads)
        server.stop()
    before, after = load_file(sft_model / "model.safetensors"), load_file(final / "model.safetensors")
    assert sum(not torch.equal(before[k], after[k]) for k in before) > 0.9 * len(before)
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 11))
    for m in metrics:
        assert m["trust/weight"] == pytest.approx(0.3 * math.exp(-m["step"] / 5))
        assert 0.0 < m["trust/gamma_mean"] <= 1.0 and m["time/judge"] >= 0
        assert m["trust/judge_calls"] + m["trust/cache_hits"] == m["trust/judge_requests"]  # no retries
        assert m["trust/judge_no_reply"] == 0 and m["trust/cache_hits"] >= 0
        assert m["trust/judge_failures"] == m["trust/judge_unparsable"]
        assert m["trust/judge_requests"] == G * round(m["trust/frac_groups_sent"] * 2)
    assert sum(m["trust/judge_calls"] for m in metrics) > 0
    assert sum(m["trust/cache_hits"] for m in metrics) > 0
    assert sum(m["trust/frac_groups_sent"] for m in metrics) < 10  # some groups were all right / all wrong
    assert any(m["trust/frac_groups_judged"] > 0 for m in metrics)  # the judge's replies were read
    samples = read_metrics(tmp_path / "run" / "samples.jsonl")
    assert all(f"reward/{PROCESS_KEY}" in s for s in samples)
    print("judge calls per step", [m["trust/judge_calls"] for m in metrics],
          "cache hits", [m["trust/cache_hits"] for m in metrics],
          "unparsable", [m["trust/judge_unparsable"] for m in metrics],
          "gamma", [round(m["trust/gamma_mean"], 3) for m in metrics])


def _wait_judged_steps(path: Path, proc: subprocess.Popen, n: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = read_metrics(path) if path.exists() else []
        if sum(m["trust/judge_calls"] > 0 for m in metrics) >= n:
            return metrics
        assert proc.poll() is None, "the RL run ended before the judge answered twice"
        time.sleep(0.05)
    pytest.fail(f"no {n} judged steps within {timeout}s")


@pytest.mark.slow
def test_judge_server_killed_mid_run(sft_model: Path, synth_dir: Path, tmp_path: Path) -> None:
    server: Served = start_server(sft_model, tmp_path / "server.log")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["rl", "--config", str(RECIPE), *_overrides(sft_model, synth_dir, out, server.url + "/v1", 14)]
    proc = subprocess.Popen([sys.executable, "-m", "vlrl.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        seen = _wait_judged_steps(out / "metrics.jsonl", proc, 2, timeout=240)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=10)
        log = proc.communicate(timeout=240)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()
    assert proc.returncode == 0, log[-4000:]
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 15))
    assert len(seen) < 14, "the run finished before the kill"
    after = [m for m in metrics if m["step"] > len(seen) + 1]  # steps that began after the kill
    assert sum(m["trust/judge_failures"] for m in metrics) > 0
    for m in after:  # every completion sent was answered from the cache or left without a process reward
        assert m["trust/judge_no_reply"] + m["trust/cache_hits"] == m["trust/judge_requests"]
        assert m["trust/judge_failures"] >= m["trust/judge_no_reply"]
    assert sum(m["trust/judge_no_reply"] for m in after) > 0
    assert all(m["trust/frac_groups_judged"] == 0 or m["trust/cache_hits"] > 0 for m in after)
    print("kill after step", len(seen), "failures per step", [m["trust/judge_failures"] for m in metrics])
