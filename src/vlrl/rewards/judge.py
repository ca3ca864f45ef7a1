"""An LLM judge as a reward: a client for any OpenAI-compatible `/chat/completions` endpoint.

`JudgeClient(JudgeConfig(base_url, model)).score(completions, samples, template)` returns one value in [0, 1]
or None per completion:

- the prompt is a template of `judge_prompts` ("process": SophiaVL-R1's thinking-reward rubric;
  "accuracy": Innovator-VL-style weighted format / reasoning / answer sub-scores), the sample's images go
  along as PNG data URLs;
- calls run concurrently in a thread pool of `max_concurrency`; each has a time-out (on connecting, on each
  read, and on the whole body, checked as it arrives) and is retried with exponential backoff on time-outs,
  connection errors, 5xx, 408, 429 and replies that are not a chat completion (never on other 4xx, nor on a
  well-formed reply without a score: the judge's answer, cached);
- one `score` call (one RL step's batch) has a deadline, `step_timeout`, across all its calls, retries and
  waits: no call starts and no backoff ends after it, and a call's time-out is cut to the time left, so a slow,
  hung or failing judge cannot stall a step; items not judged by then give None;
- replies are cached by (judge model, template, rendered prompt, image hashes) in memory and, with
  `cache_path`, in a jsonl file that later runs reuse; the reply text is cached, not the score, so a
  repeated unparsable reply is not re-requested either;
- a failed call (after retries), an unreadable image or an unparsable reply gives None and is counted in
  `client.stats` (`JudgeStats`: every failure under one cause of `FAILURE_KINDS`).

Time is read from the `clock` and waited with the `sleep` given to `JudgeClient` (time.monotonic and
time.sleep by default), so tests drive retries, backoff and deadlines without waiting.

The API key is read from the environment variable `api_key_env` (default VLRL_JUDGE_API_KEY) when the client
is built and sent as `Authorization: Bearer ...`. It is never logged, written to the cache, shown by a repr
or put in an exception message.

Importing this module registers the rewards (configuration keywords = `JudgeConfig`
fields):
`judge_process`, `judge_accuracy`, and `judge` whose `template` keyword (default "process") a sample may
override with `metadata["judge_template"]`, so one run can judge each dataset with its own template.
They run in the trainer's process (registered cheap): the work is network I/O with its own time limits, and
the in-memory cache lives across steps. `judge_metrics()` gives the clients' counters for the metric log.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlrl.data.sample import IMAGE_PLACEHOLDER
from vlrl.rewards.judge_prompts import SYSTEM_PROMPT, TEMPLATES, parse_reply, render
from vlrl.rewards.registry import register_reward

if TYPE_CHECKING:
    import httpx

    from vlrl.data.sample import Sample

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429})  # plus every 5xx
# The causes of an item's failure, each a `JudgeStats` counter; they add up to `failures`.
FAILURE_KINDS = ("timeouts", "http_errors", "connection_errors", "malformed", "over_deadline", "image_errors",
                 "errors")
_KIND_COUNTER = {"timeout": "timeouts", "http": "http_errors", "connection": "connection_errors",
                 "malformed": "malformed", "deadline": "over_deadline"}
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
MAX_CACHED_REPLY_CHARS = 20_000
IMAGE_CACHE_SIZE = 16  # encoded images kept (a group's G completions share one image)


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge is and how to call it. Hashable: one client per distinct config. Each field's
    trailing comment documents it (`vlrl rl --help` prints them as `trust.judge.*`).

    timeout: the body deadline is checked as data arrives, so a server that sends nothing is caught by the
    read time-out. Retries: the k-th waits min(max_backoff, backoff * 2**k) seconds (+ up to 10 % jitter),
    or the server's Retry-After if shorter.
    """

    base_url: str  # endpoint base, e.g. http://127.0.0.1:8000/v1 (/chat/completions appended unless present)
    model: str  # the judge model's name at that endpoint
    api_key_env: str = "VLRL_JUDGE_API_KEY"  # environment variable holding the API key (unset/empty: no key)
    timeout: float = 60.0  # seconds for connecting, for each read and for the whole body of one response
    max_retries: int = 3  # retries after the first attempt
    backoff: float = 1.0  # seconds: the k-th retry waits min(max_backoff, backoff * 2**k)
    max_backoff: float = 30.0  # seconds: the longest wait between retries
    max_concurrency: int = 8  # requests in flight at once
    step_timeout: float = 600.0  # seconds: one scoring batch (an RL step's) ends by then, retries included;
    #   items not judged by then get no reward (counted as over_deadline)
    temperature: float = 0.0  # the judge's sampling temperature
    max_tokens: int = 512  # the judge's reply length limit, in tokens
    cache_path: str | None = None  # jsonl of cached replies (read at start, appended to); null: memory only
    cache_size: int = 100_000  # cached replies kept in memory (least recently used dropped first)
    image_max_pixels: int = 1280 * 28 * 28  # images are downscaled to at most this many pixels
    max_images: int = 4  # images sent per request, at most
    max_response_chars: int = 16_000  # the judged completion is cut to this many characters
    weights: tuple[float, float, float] = (0.1, 0.3, 0.6)  # (format, reasoning, answer) weights of the
    #   "accuracy" template

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ValueError("judge model must be set")
        positive = {"timeout": self.timeout, "step_timeout": self.step_timeout,
                    "max_concurrency": self.max_concurrency, "max_tokens": self.max_tokens,
                    "cache_size": self.cache_size, "image_max_pixels": self.image_max_pixels,
                    "max_response_chars": self.max_response_chars}
        bad = [k for k, v in positive.items() if not v > 0]
        if bad or self.max_retries < 0 or self.backoff < 0 or self.max_backoff < 0 or self.max_images < 0:
            raise ValueError(f"judge settings out of range: {', '.join(bad) or 'a retry/backoff/max_images value'}")
        weights = tuple(float(w) for w in self.weights)
        if len(weights) != 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"judge weights must be 3 non-negative numbers with a positive sum, got {self.weights}")
        object.__setattr__(self, "weights", weights)

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"


class _Secret:
    """A string that never shows itself: repr/str print '***', and it refuses to be pickled."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("the judge API key cannot be pickled")


@dataclass
class JudgeStats:
    """Cumulative counters of one client (thread-safe via `add`).

    requests: items asked to score. cache_hits: items answered from the cache. calls: HTTP requests sent
    (retries included). retries: repeated attempts. failures: items that got no reply, each counted under
    the cause that ended it (`FAILURE_KINDS`): timeouts (the last attempt timed out), http_errors (an error
    status), connection_errors (refused, reset), malformed (the last reply was not a chat completion, or too
    large), over_deadline (the step deadline passed first: not sent, or no time left to retry),
    image_errors (an image could not be read; nothing sent), errors (anything else: a bug).
    unparsable: items whose reply held no score (not failures: the judge answered). seconds: time spent in
    `score`, on the client's clock.
    """

    requests: int = 0
    cache_hits: int = 0
    calls: int = 0
    retries: int = 0
    failures: int = 0
    timeouts: int = 0
    http_errors: int = 0
    connection_errors: int = 0
    malformed: int = 0
    over_deadline: int = 0
    image_errors: int = 0
    errors: int = 0
    unparsable: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for key, delta in deltas.items():
                setattr(self, key, getattr(self, key) + delta)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}


class _CallFailed(Exception):
    """Why a call gave no reply: `kind` (a key of `_KIND_COUNTER`), whether a retry may help, the server's
    Retry-After, and whether the request was never sent (the step deadline had passed)."""

    def __init__(self, kind: str, detail: str, retryable: bool, retry_after: float | None = None,
                 unsent: bool = False) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after
        self.unsent = unsent


class ReplyCache:
    """Judge replies by key: an LRU in memory, optionally mirrored to an append-only jsonl file."""

    def __init__(self, path: str | None, size: int) -> None:
        self.path = Path(path) if path else None
        self.size = size
        self._data: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        if self.path is not None and self.path.exists():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        bad = 0
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    key, reply = rec["key"], rec["reply"]
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                if isinstance(key, str) and isinstance(reply, str):
                    self._put(key, reply)
        if bad:
            log.warning("judge cache %s: skipped %d unreadable line(s)", path, bad)

    def _put(self, key: str, reply: str) -> None:
        self._data[key] = reply
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def get(self, key: str) -> str | None:
        with self._lock:
            reply = self._data.get(key)
            if reply is not None:
                self._data.move_to_end(key)
            return reply

    def put(self, key: str, reply: str) -> None:
        reply = reply[:MAX_CACHED_REPLY_CHARS]
        with self._lock:
            self._put(key, reply)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"key": key, "reply": reply}) + "\n")

    def __len__(self) -> int:
        return len(self._data)


def question_text(sample: Sample) -> str:
    """The question the judge sees: the sample's user turns (with their `<image>` placeholders); SophiaVL-R1
    prefixes "<image> " when the sample has an image and the text has no placeholder."""
    text = "\n\n".join(m["content"] for m in sample.messages if m.get("role") == "user")
    if sample.images and IMAGE_PLACEHOLDER not in text:
        text = f"{IMAGE_PLACEHOLDER} {text}"
    return text


def png_data_url(path: str, max_pixels: int) -> tuple[str, str]:
    """(data URL, sha256 of the PNG) of the image at `path`, downscaled to at most `max_pixels` pixels."""
    from vlrl.data.images import load_image

    image = load_image(path, max_pixels=max_pixels, factor=1, min_pixels=1)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    png = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii"), hashlib.sha256(png).hexdigest()


@dataclass
class _Item:
    """One judgement to make: the chat messages to send and the cache key."""

    index: int
    template: str
    messages: list[dict[str, Any]] | None
    key: str


class JudgeClient:
    """Scores completions with an OpenAI-compatible judge; see the module doc. Thread-safe; `close()` it."""

    def __init__(self, config: JudgeConfig, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, transport: httpx.BaseTransport | None = None) -> None:
        """`clock` and `sleep` time the deadlines and backoff waits (tests pass fake ones, so retries are tested
        without waiting); `transport` replaces the network (tests pass an `httpx.MockTransport`)."""
        try:
            import httpx
        except ImportError as exc:  # pragma: no cover - httpx ships with the serve/dev extras
            raise ImportError("the judge client needs httpx: pip install 'vlrl[serve]'") from exc
        self.config = config
        self._clock = clock
        self._sleep = sleep
        key = os.environ.get(config.api_key_env, "")
        self._api_key = _Secret(key) if key else None
        self.stats = JudgeStats()
        self.cache = ReplyCache(config.cache_path, config.cache_size)
        limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency)
        self._http = httpx.Client(timeout=httpx.Timeout(config.timeout), limits=limits, follow_redirects=False,
                                  transport=transport)
        self._images: OrderedDict[tuple[str, int], tuple[str, str]] = OrderedDict()
        self._images_lock = threading.Lock()

    def __repr__(self) -> str:
        key = "set" if self._api_key is not None else "unset"
        return (f"JudgeClient(url={self.config.url!r}, model={self.config.model!r}, "
                f"api_key_env={self.config.api_key_env!r} ({key}))")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- public
    def score(self, completions: Sequence[str], samples: Sequence[Sample],
              template: str | Sequence[str] = "process") -> list[float | None]:
        """One value in [0, 1] or None per completion; `template` is one name or one per completion."""
        if len(completions) != len(samples):
            raise ValueError(f"{len(completions)} completions but {len(samples)} samples")
        templates = [template] * len(samples) if isinstance(template, str) else list(template)
        if len(templates) != len(samples) or any(t not in TEMPLATES for t in templates):
            raise ValueError(f"need one template per sample, each one of {', '.join(TEMPLATES)}")
        start = self._clock()
        deadline = start + self.config.step_timeout
        unsent_before = self.stats.over_deadline
        self.stats.add(requests=len(samples))
        items = [self._item(i, t, c, s) for i, (t, c, s) in enumerate(zip(templates, completions, samples))]
        values: list[float | None] = [None] * len(items)
        with ThreadPoolExecutor(max_workers=self.config.max_concurrency, thread_name_prefix="judge") as pool:
            for item, value in zip(items, pool.map(lambda it: self._judge(it, deadline), items)):
                values[item.index] = value
        self.stats.add(seconds=self._clock() - start)
        over = self.stats.over_deadline - unsent_before
        if over:
            log.warning("judge: step deadline (step_timeout=%ss) reached; %d of %d items not judged",
                        self.config.step_timeout, over, len(items))
        return values

    # ---------------------------------------------------------------- helpers
    def _image(self, path: str) -> tuple[str, str]:
        key = (path, self.config.image_max_pixels)
        with self._images_lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        encoded = png_data_url(path, self.config.image_max_pixels)
        with self._images_lock:
            self._images[key] = encoded
            while len(self._images) > IMAGE_CACHE_SIZE:
                self._images.popitem(last=False)
        return encoded

    def _item(self, index: int, template: str, completion: str, sample: Sample) -> _Item:
        """The judge's messages for one completion; messages None when an image cannot be read."""
        cfg = self.config
        text = render(template, question=question_text(sample), response=completion[: cfg.max_response_chars],
                      answer=str(sample.answer))
        try:
            images = [self._image(p) for p in sample.images[: cfg.max_images]]
        except Exception as exc:  # noqa: BLE001 - DataError, OSError ...: this item cannot be judged
            log.warning("judge: sample %s: image unusable (%s)", sample.id, exc)
            return _Item(index, template, None, "")
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]  # text first, then images (SophiaVL-R1)
        content += [{"type": "image_url", "image_url": {"url": url}} for url, _ in images]
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT},
                                          {"role": "user", "content": content}]
        ident = json.dumps([cfg.model, cfg.temperature, cfg.max_tokens, template, text, [h for _, h in images]])
        return _Item(index, template, messages, hashlib.sha256(ident.encode("utf-8")).hexdigest())

    def _judge(self, item: _Item, deadline: float) -> float | None:
        try:
            return self._judge_item(item, deadline)
        except Exception as exc:  # noqa: BLE001 - one item never sinks the batch
            self.stats.add(failures=1, errors=1)
            log.warning("judge: item %d failed: %s", item.index, self._redact(f"{type(exc).__name__}: {exc}"))
            return None

    def _judge_item(self, item: _Item, deadline: float) -> float | None:
        if item.messages is None:
            self.stats.add(failures=1, image_errors=1)
            return None
        reply = self.cache.get(item.key)
        if reply is not None:
            self.stats.add(cache_hits=1)
        else:
            reply = self._call_with_retries(item.messages, deadline)
            if reply is None:
                return None
            self.cache.put(item.key, reply)
        value = parse_reply(item.template, reply, self.config.weights)
        if value is None:
            self.stats.add(unparsable=1)
        return value

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.config.max_backoff, self.config.backoff * 2**attempt)
        delay += random.uniform(0.0, 0.1 * delay)
        if retry_after is not None and 0 <= retry_after < delay:
            delay = retry_after
        return delay

    def _call_with_retries(self, messages: list[dict[str, Any]], deadline: float) -> str | None:
        """The reply text, or None (counted under its cause) once retries, or the time to `deadline`, run out.
        A retry happens only if its backoff ends before the deadline: waiting past it could not help."""
        payload = json.dumps({"model": self.config.model, "messages": messages, "stream": False,
                              "temperature": self.config.temperature, "max_tokens": self.config.max_tokens})
        for attempt in range(self.config.max_retries + 1):
            try:
                return self._call(payload.encode("utf-8"), deadline)
            except _CallFailed as err:
                delay = self._delay(attempt, err.retry_after)
                if err.retryable and attempt < self.config.max_retries and self._clock() + delay >= deadline:
                    err = _CallFailed("deadline", f"step deadline reached after {err}", retryable=False)
                if not err.retryable or attempt == self.config.max_retries:
                    self.stats.add(failures=1, **{_KIND_COUNTER[err.kind]: 1})
                    if not err.unsent:  # items never sent are summed up once by `score`
                        log.warning("judge call failed after %d attempt(s): %s", attempt + 1,
                                    self._redact(str(err)))
                    return None
                self.stats.add(retries=1)
                log.debug("judge call attempt %d failed (%s); retrying", attempt + 1, self._redact(str(err)))
                self._sleep(delay)
        return None

    def _redact(self, text: str) -> str:
        if self._api_key is not None and self._api_key.reveal():
            text = text.replace(self._api_key.reveal(), "***")
        return text[:500]

    def _call(self, payload: bytes, step_deadline: float) -> str:
        """One HTTP request; the reply's message content, or `_CallFailed` saying whether to retry. Its
        time-out is `timeout`, cut to the time left before `step_deadline`; none is sent past that."""
        import httpx

        now = self._clock()
        timeout = min(self.config.timeout, step_deadline - now)
        if timeout <= 0:
            raise _CallFailed("deadline", "step deadline reached before the call", retryable=False, unsent=True)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key.reveal()}"
        self.stats.add(calls=1)
        deadline = now + timeout
        try:
            with self._http.stream("POST", self.config.url, content=payload, headers=headers,
                                   timeout=httpx.Timeout(timeout)) as resp:
                body = bytearray()
                for chunk in resp.iter_bytes():
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise _CallFailed("malformed", "response too large", retryable=True)
                    if self._clock() > deadline:
                        raise _CallFailed("timeout", f"response took over {timeout:.3g}s", retryable=True)
                status = resp.status_code
                retry_after = _retry_after(resp.headers.get("retry-after"))
        except httpx.TimeoutException as exc:
            raise _CallFailed("timeout", type(exc).__name__, retryable=True) from None
        except httpx.TransportError as exc:  # connection refused/reset, protocol errors
            raise _CallFailed("connection", f"{type(exc).__name__}: {exc}", retryable=True) from None
        if status >= 400:
            retryable = status >= 500 or status in RETRY_STATUS
            raise _CallFailed("http", f"status {status}: {_error_message(bytes(body))}", retryable, retry_after)
        return _reply_content(bytes(body))


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])[:200]
    except Exception:  # noqa: BLE001 - any non-OpenAI error body
        return body[:200].decode("utf-8", errors="replace")


def _reply_content(body: bytes) -> str:
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _CallFailed("malformed", "response is not a chat completion", retryable=True) from None
    if not isinstance(content, str):
        raise _CallFailed("malformed", "message content is not a string", retryable=True)
    return content


# -------------------------------------------------------------------------------- registered rewards
_CLIENTS: dict[JudgeConfig, JudgeClient] = {}
_CLIENTS_LOCK = threading.Lock()
JUDGE_PARAMS = tuple(f.name for f in dataclasses.fields(JudgeConfig))


def get_client(config: JudgeConfig) -> JudgeClient:
    """The shared client of `config` (built on first use), so its cache and counters persist across steps."""
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(config)
        if client is None:
            client = _CLIENTS[config] = JudgeClient(config)
        return client


def close_clients() -> None:
    with _CLIENTS_LOCK:
        for client in _CLIENTS.values():
            client.close()
        _CLIENTS.clear()


def judge_metrics() -> dict[str, float]:
    """Counters of every shared client, summed: {"judge/calls": ..., "judge/cache_hits": ...}."""
    totals: dict[str, float] = {}
    with _CLIENTS_LOCK:
        clients = list(_CLIENTS.values())
    for client in clients:
        for key, value in client.stats.as_dict().items():
            totals[f"judge/{key}"] = totals.get(f"judge/{key}", 0) + value
    return totals


def config_from_kwargs(settings: dict[str, Any]) -> JudgeConfig:
    """A JudgeConfig from a reward's keywords (runtime keywords the trainer adds are ignored)."""
    picked = {k: v for k, v in settings.items() if k in JUDGE_PARAMS}
    if "base_url" not in picked or "model" not in picked:
        raise ValueError("judge rewards need base_url and model (e.g. kwargs: {base_url: http://127.0.0.1:8000/v1, "
                         "model: judge})")
    if "weights" in picked:
        picked["weights"] = tuple(picked["weights"])
    return JudgeConfig(**picked)


def _score(completions: list[str], samples: list[Sample], template: str | list[str],
           settings: dict[str, Any]) -> list[float | None]:
    return get_client(config_from_kwargs(settings)).score(completions, samples, template)


@register_reward("judge_process", cheap=True, chunkable=False, params=JUDGE_PARAMS)
def judge_process(completions: list[str], samples: list[Sample], **settings: Any) -> list[float | None]:
    """SophiaVL-R1 thinking reward from an LLM judge, in [0, 1]; None when the judge gave no score."""
    return _score(completions, samples, "process", settings)


@register_reward("judge_accuracy", cheap=True, chunkable=False, params=JUDGE_PARAMS)
def judge_accuracy(completions: list[str], samples: list[Sample], **settings: Any) -> list[float | None]:
    """Innovator-VL-style weighted format / reasoning / answer score from an LLM judge, in [0, 1]."""
    return _score(completions, samples, "accuracy", settings)


@register_reward("judge", cheap=True, chunkable=False, params=(*JUDGE_PARAMS, "template"))
def judge_reward(completions: list[str], samples: list[Sample], template: str = "process",
                 **settings: Any) -> list[float | None]:
    """The judge with `template` ("process" | "accuracy"), overridden per sample by
    `sample.metadata["judge_template"]` (so each dataset can pick its own)."""
    templates = [str(s.metadata.get("judge_template", template)) for s in samples]
    return _score(completions, samples, templates, settings)
