"""A cached, retrying client for OpenAI-compatible chat endpoints, and SRA-CL's summary requests.

`ChatClient` sends ``POST {base_url}/chat/completions`` with the standard library only, keeps every
answer in an on-disk cache (one JSON file per prompt, written atomically the moment the answer
arrives), and retries transient failures with exponential backoff and jitter.  A crashed or
repeated run therefore never asks a cached prompt again.

`summarise_items` / `summarise_users` produce the texts SRA-CL embeds: the LLM's answers to the
paper's prompts (`sracl_jax.semantic.prompts`) with a client, the offline template texts without.

The API key is read from an environment variable when requests are about to be sent; it is never
stored on the client and never written to logs, exception messages, reprs or cache files.
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import hashlib
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from absl import logging

from seqrec_jax import fileio
from tqdm import tqdm

from sracl_jax.semantic import prompts as prompts_lib

_REDACTED = "[REDACTED]"
_MAX_ERROR_CHARS = 500


class LLMError(RuntimeError):
  """Base class of the client's errors."""


class LLMConfigError(LLMError):
  """Missing API key or bad client settings."""


class LLMRequestError(LLMError):
  """The server refused a request with a status that retrying will not fix (4xx other than 429)."""

  def __init__(self, message: str, status: int):
    super().__init__(message)
    self.status = status


class LLMRetriesExhausted(LLMError):
  """A prompt still failed after all retries."""


class _Aborted(LLMError):
  """Raised inside workers when another prompt's failure has stopped the run."""


class _Transient(Exception):
  """One failed attempt worth retrying; ``retry_after`` is the server's wait in seconds, if any."""

  def __init__(self, reason: str, retry_after: Optional[float] = None):
    super().__init__(reason)
    self.reason = reason
    self.retry_after = retry_after


def _default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "sracl_jax", "llm")


def _redact(text: str, secret: Optional[str]) -> str:
  if secret:
    text = text.replace(secret, _REDACTED)
  return text


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
  """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent.

  Args:
    value: the header value, or None.
    now: the current time (seconds since the epoch) for HTTP dates; defaults to time.time().

  Returns:
    A non-negative number of seconds, or None when the header is absent or unreadable.
  """
  if value is None:
    return None
  value = value.strip()
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError, IndexError):
    return None
  if when is None:
    return None
  return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_message(body: bytes) -> str:
  """The server's error text: ``error.message`` of a JSON body, else the body, shortened."""
  text = body.decode("utf-8", errors="replace")
  try:
    obj = json.loads(text)
  except ValueError:
    obj = None
  if isinstance(obj, dict):
    err = obj.get("error", obj)
    if isinstance(err, dict) and isinstance(err.get("message"), str):
      text = err["message"]
    elif isinstance(err, str):
      text = err
  text = " ".join(text.split())
  return text[:_MAX_ERROR_CHARS] + ("..." if len(text) > _MAX_ERROR_CHARS else "")


class ChatClient:
  """Cached, retrying, concurrent client of an OpenAI-compatible ``/chat/completions`` endpoint.

  Each prompt is sent as ``{"model", "messages": [{"role": "user", "content": prompt}],
  "temperature", "max_tokens"}`` (a ``system`` message first when given) and the answer is
  ``choices[0].message.content``.

  Failures and what happens:
    * timeouts, connection errors, HTTP 429 and 5xx, a 200 reply that is not JSON or lacks
      ``choices[0].message.content`` (or whose content is empty): retried up to ``max_retries``
      times (``max_retries + 1`` attempts), sleeping ``min(backoff_max_s, backoff_base_s * 2**k)``
      times a uniform jitter factor in [0.5, 1] before retry k+1; a 429's (or 5xx's)
      ``Retry-After`` is used instead when present (capped at ``retry_after_max_s``).  Then
      `LLMRetriesExhausted` naming the prompt's cache key and the last failure.
    * any other 4xx (401, 400, 404, ...): `LLMRequestError` at once, with the status and the
      server's error message.
    * missing API key: `LLMConfigError` naming the environment variable, before any request.

  The cache key is the sha256 of the JSON of (model, temperature, prompt), plus the system
  message and ``extra_body`` when given; each answer is stored at
  ``cache_dir/<key[:2]>/<key>.json`` (with the model, temperature, messages and answer, never the
  key) through a temporary file and ``os.replace``.
  """

  def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
               temperature: float = 0.0, max_tokens: Optional[int] = 512,
               timeout_s: float = 60.0, max_retries: int = 6, backoff_base_s: float = 1.0,
               backoff_max_s: float = 60.0, retry_after_max_s: float = 600.0,
               concurrency: int = 8, cache_dir: Optional[str] = None,
               extra_body: Optional[Mapping[str, object]] = None, progress: bool = True,
               sleep: Optional[Callable[[float], None]] = None,
               rng: Optional[random.Random] = None):
    """Creates the client; nothing is sent and the key is not read yet.

    Args:
      base_url: endpoint root, e.g. "https://api.deepseek.com/v1"; "/chat/completions" is added.
      model: model name sent with every request, e.g. "deepseek-chat".
      api_key_env: name of the environment variable holding the API key (sent as
        ``Authorization: Bearer <key>``), read when requests are about to be sent.
      temperature: sampling temperature (the paper: 0).
      max_tokens: answer length cap sent with each request; None leaves it out.
      timeout_s: socket timeout of one attempt, in seconds.
      max_retries: retries after the first attempt of a prompt.
      backoff_base_s: first retry's (pre-jitter) sleep; doubles with every retry.
      backoff_max_s: cap on the exponential sleep.
      retry_after_max_s: cap on a server's ``Retry-After``.
      concurrency: requests in flight at once (threads).
      cache_dir: answer cache folder; defaults to ``$XDG_CACHE_HOME/sracl_jax/llm``
        (``~/.cache/...``).
      extra_body: further request fields, e.g. ``{"top_p": 0.001}`` as the paper sends; part of
        the cache key when given.
      progress: show a tqdm progress bar in `complete_many`.
      sleep: function used to wait between retries (tests inject a recorder); by default an
        interruptible wait that ends early when the run is stopped.
      rng: random source of the jitter; defaults to a fresh `random.Random()`.
    """
    if urllib.parse.urlparse(base_url).scheme not in ("http", "https"):
      raise LLMConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
    if concurrency < 1 or max_retries < 0 or timeout_s <= 0:
      raise LLMConfigError("need concurrency >= 1, max_retries >= 0 and timeout_s > 0")
    self.base_url = base_url.rstrip("/")
    self.url = self.base_url + "/chat/completions"
    self.model = model
    self.api_key_env = api_key_env
    self.temperature = float(temperature)
    self.max_tokens = max_tokens
    self.timeout_s = float(timeout_s)
    self.max_retries = int(max_retries)
    self.backoff_base_s = float(backoff_base_s)
    self.backoff_max_s = float(backoff_max_s)
    self.retry_after_max_s = float(retry_after_max_s)
    self.concurrency = int(concurrency)
    self.cache_dir = os.path.abspath(os.path.expanduser(cache_dir or _default_cache_dir()))
    self.extra_body = dict(extra_body or {})
    self.progress = progress
    self._sleep = sleep
    self._rng = rng or random.Random()
    self._rng_lock = threading.Lock()

  def __repr__(self) -> str:
    return (f"ChatClient(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
            f"temperature={self.temperature}, cache_dir={self.cache_dir!r})")

  # -- cache ---------------------------------------------------------------------------------

  def cache_key(self, prompt: str, system: Optional[str] = None) -> str:
    """sha256 hex of (model, temperature, prompt) [+ system, extra_body when given].

    Args:
      prompt: the user message.
      system: the system message, if any.

    Returns:
      64 hex characters.
    """
    ident = {"model": self.model, "temperature": self.temperature, "prompt": prompt}
    if system is not None:
      ident["system"] = system
    if self.extra_body:
      ident["extra_body"] = self.extra_body
    blob = json.dumps(ident, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()

  def cache_path(self, key: str) -> str:
    """The cache file of a cache key: ``cache_dir/<key[:2]>/<key>.json``."""
    return os.path.join(self.cache_dir, key[:2], key + ".json")

  def cached(self, prompt: str, system: Optional[str] = None) -> Optional[str]:
    """The cached answer of a prompt, or None.

    Args:
      prompt: the user message.
      system: the system message, if any.

    Returns:
      The answer, or None when not cached (an unreadable cache file counts as not cached).
    """
    path = self.cache_path(self.cache_key(prompt, system))
    try:
      with open(path, "r", encoding="utf-8") as f:
        entry = json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError) as e:
      logging.warning("Ignoring unreadable LLM cache file %s (%s).", path, type(e).__name__)
      return None
    if (not isinstance(entry, dict) or entry.get("prompt") != prompt
        or entry.get("system") != system or not isinstance(entry.get("answer"), str)):
      logging.warning("Ignoring LLM cache file %s: it does not match its prompt.", path)
      return None
    return entry["answer"]

  def _store(self, key: str, prompt: str, system: Optional[str], answer: str) -> None:
    path = self.cache_path(key)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    entry = {"model": self.model, "temperature": self.temperature, "system": system,
             "prompt": prompt, "answer": answer, "time": time.time()}
    if self.extra_body:
      entry["extra_body"] = self.extra_body
    fileio.atomic_write(path, lambda f: json.dump(entry, f, ensure_ascii=False), mode="w")

  # -- requests --------------------------------------------------------------------------------

  def _api_key(self) -> str:
    key = os.environ.get(self.api_key_env, "")
    if not key.strip():
      raise LLMConfigError(
          f"The API key environment variable {self.api_key_env} is not set (or empty); set it to "
          f"the key for {self.base_url}.")
    return key.strip()

  def backoff_s(self, retry: int) -> float:
    """Sleep before retry ``retry + 1`` (0-based): capped exponential times jitter in [0.5, 1]."""
    base = min(self.backoff_max_s, self.backoff_base_s * (2.0 ** retry))
    with self._rng_lock:
      jitter = 0.5 + 0.5 * self._rng.random()
    return base * jitter

  def _body(self, prompt: str, system: Optional[str]) -> bytes:
    messages = []
    if system is not None:
      messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    body = dict(self.extra_body)
    body.update({"model": self.model, "messages": messages, "temperature": self.temperature})
    if self.max_tokens is not None:
      body["max_tokens"] = int(self.max_tokens)
    return json.dumps(body, ensure_ascii=False).encode("utf-8")

  def _attempt(self, body: bytes, api_key: str) -> str:
    """One POST; the answer, or `_Transient` / `LLMRequestError` (messages already redacted)."""
    request = urllib.request.Request(
        self.url, data=body, method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json",
                 "Authorization": f"Bearer {api_key}"})
    try:
      with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
        raw = response.read()
    except urllib.error.HTTPError as e:
      try:
        detail = _error_message(e.read())
      except (OSError, http.client.HTTPException):
        detail = ""
      finally:
        e.close()
      detail = _redact(detail, api_key)
      status = e.code
      if status == 429 or status >= 500:
        retry_after = parse_retry_after(e.headers.get("Retry-After"))
        raise _Transient(f"HTTP {status}: {detail}", retry_after) from None
      raise LLMRequestError(f"HTTP {status} from {self.url}: {detail}", status) from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, refused / reset connections
      reason = getattr(e, "reason", None) or e
      raise _Transient(_redact(f"{type(e).__name__}: {reason}", api_key)) from None
    try:
      reply = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
      head = _redact(raw[:200].decode("utf-8", "replace"), api_key)
      raise _Transient(f"reply is not JSON: {head!r}") from None
    try:
      content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
      raise _Transient("reply lacks choices[0].message.content") from None
    if not isinstance(content, str) or not content.strip():
      raise _Transient("reply has an empty or non-text choices[0].message.content")
    return content

  def _ask(self, prompt: str, system: Optional[str], key: str, api_key: str,
           stop: threading.Event) -> str:
    """Asks one prompt with retries, caches the answer, returns it; a failure stops the run."""
    try:
      return self._ask_with_retries(prompt, system, key, api_key, stop)
    except _Aborted:
      raise
    except BaseException:
      stop.set()  # here, in the worker, so that no queued prompt starts after a failure
      raise

  def _ask_with_retries(self, prompt: str, system: Optional[str], key: str, api_key: str,
                        stop: threading.Event) -> str:
    body = self._body(prompt, system)
    last = None
    for attempt in range(self.max_retries + 1):
      if stop.is_set():
        raise _Aborted(f"prompt {key} not asked: the run was stopped")
      try:
        answer = self._attempt(body, api_key)
      except _Transient as e:
        last = e
        if attempt == self.max_retries:
          break
        if e.retry_after is not None:
          delay = min(e.retry_after, self.retry_after_max_s)
        else:
          delay = self.backoff_s(attempt)
        logging.warning("LLM request %s failed (%s); retry %d/%d in %.2f s.", key[:16], e.reason,
                        attempt + 1, self.max_retries, delay)
        if self._sleep is not None:
          self._sleep(delay)
        else:
          stop.wait(delay)
        continue
      self._store(key, prompt, system, answer)
      return answer
    raise LLMRetriesExhausted(
        f"LLM prompt with cache key {key} failed after {self.max_retries + 1} attempts; last "
        f"failure: {last.reason if last else 'none'}")

  def complete(self, prompt: str, system: Optional[str] = None) -> str:
    """The answer to one prompt (from the cache when there).

    Args:
      prompt: the user message.
      system: optional system message.

    Returns:
      The answer text.
    """
    return self.complete_many([prompt], system=system)[0]

  def complete_many(self, prompts: Sequence[str], system: Optional[str] = None,
                    desc: str = "LLM requests") -> List[str]:
    """Answers to many prompts, in input order; asks only the uncached ones, each once.

    Uncached prompts are asked ``concurrency`` at a time; each answer is cached as soon as it
    arrives, so a run that stops part-way keeps every answer it got.  On the first prompt that
    fails for good, prompts not yet started are cancelled, those in flight are finished (and
    cached), and the failure is raised.

    Args:
      prompts: user messages; duplicates are asked once.
      system: optional system message shared by all prompts.
      desc: progress bar label.

    Returns:
      One answer per prompt, in input order.

    Raises:
      LLMConfigError: the API key variable is unset while some prompt is uncached.
      LLMRequestError: a non-retryable HTTP status (e.g. 401).
      LLMRetriesExhausted: a prompt failed after all retries.
    """
    prompts = list(prompts)
    keys = [self.cache_key(p, system) for p in prompts]
    answers: Dict[str, str] = {}
    todo: Dict[str, str] = {}  # key -> prompt, first occurrence order
    for key, prompt in zip(keys, prompts):
      if key in answers or key in todo:
        continue
      hit = self.cached(prompt, system)
      if hit is None:
        todo[key] = prompt
      else:
        answers[key] = hit
    logging.info("%s: %d prompts, %d distinct, %d cached, %d to ask (%s).", desc, len(prompts),
                 len(answers) + len(todo), len(answers), len(todo), self.model)
    if todo:
      api_key = self._api_key()
      self._run(todo, system, api_key, answers, desc)
    return [answers[k] for k in keys]

  def _run(self, todo: Dict[str, str], system: Optional[str], api_key: str,
           answers: Dict[str, str], desc: str) -> None:
    stop = threading.Event()
    bar = tqdm(total=len(todo), desc=desc, unit="prompt", disable=not self.progress)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo)),
                                                 thread_name_prefix="llm")
    failure: Optional[BaseException] = None
    try:
      futures = {pool.submit(self._ask, prompt, system, key, api_key, stop): key
                 for key, prompt in todo.items()}
      for future in concurrent.futures.as_completed(futures):
        if future.cancelled():
          continue
        error = future.exception()
        if error is None:
          answers[futures[future]] = future.result()
          bar.update(1)
        elif not isinstance(error, _Aborted) and failure is None:
          failure = error
          stop.set()
          for f in futures:
            f.cancel()
    except BaseException:  # e.g. KeyboardInterrupt: stop the workers' retry waits too
      stop.set()
      raise
    finally:
      pool.shutdown(wait=True, cancel_futures=True)
      bar.close()
    if failure is not None:
      logging.error("%s stopped: %s (%d answers cached this run).", desc, failure,
                    len([k for k in todo if k in answers]))
      raise failure


def summarise_items(item_fields: Sequence[Mapping[str, object]], domain: str,
                    client: Optional[ChatClient] = None,
                    histories: Optional[Sequence[Optional[Sequence[Sequence[str]]]]] = None
                    ) -> List[str]:
  """SRA-CL's item texts: the LLM's answers to the paper's item prompt, or offline templates.

  Args:
    item_fields: one metadata dict per item (see `prompts.item_info`).
    domain: singular domain phrase, e.g. "beauty product".
    client: a `ChatClient`; None returns `prompts.item_template_text` of every item and sends
      nothing.
    histories: optional, per item, the co-purchase title sequences of training users (see
      `prompts.item_user_prompt`); None gives every item " [None] ".

  Returns:
    One text per item, in input order (with a client: the raw answer, which the paper's prompt
    asks to be JSON with "item summary" and "potential user analysis"; the paper embeds it as is).
  """
  if client is None:
    return [prompts_lib.item_template_text(f) for f in item_fields]
  if histories is not None and len(histories) != len(item_fields):
    raise ValueError(f"histories has {len(histories)} entries for {len(item_fields)} items")
  user_msgs = [prompts_lib.item_user_prompt(f, domain, history=None if histories is None
                                            else histories[i])
               for i, f in enumerate(item_fields)]
  return client.complete_many(user_msgs, system=prompts_lib.item_system_prompt(domain),
                              desc="item summaries")


def summarise_users(prefix_titles: Sequence[Sequence[str]], domain: str,
                    client: Optional[ChatClient] = None,
                    max_items: int = prompts_lib.MAX_USER_ITEMS) -> List[str]:
  """SRA-CL's user texts: the LLM's preference summaries of each prefix, or offline templates.

  Args:
    prefix_titles: per user (or per prefix), the titles of its training items, oldest first.
    domain: singular domain phrase, e.g. "beauty product".
    client: a `ChatClient`; None returns `prompts.user_template_text` of every prefix and sends
      nothing.
    max_items: only the most recent this many titles are used (the paper's window is 20).

  Returns:
    One text per prefix, in input order.

  Raises:
    ValueError: with a client, a prefix without any non-empty title.
  """
  if client is None:
    return [prompts_lib.user_template_text(t, max_items=max_items) for t in prefix_titles]
  empty = [i for i, t in enumerate(prefix_titles) if not prompts_lib.user_user_prompt(t)]
  if empty:
    raise ValueError(f"{len(empty)} prefixes have no titles to summarise (first: index {empty[0]})")
  user_msgs = [prompts_lib.user_user_prompt(t, max_items=max_items) for t in prefix_titles]
  return client.complete_many(user_msgs, system=prompts_lib.user_system_prompt(domain),
                              desc="user summaries")
