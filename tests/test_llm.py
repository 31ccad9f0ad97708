"""Tests of the LLM client and SRA-CL prompts against a scripted fake server on 127.0.0.1."""

import http.server
import json
import logging as std_logging
import os
import random
import threading
import time
import urllib.request

import pytest

from sracl_jax.semantic import llm
from sracl_jax.semantic import prompts

KEY = "sk-SENTINEL-3f9a1c77e2b04d5e"
ENV = "SRACL_TEST_LLM_KEY"
TIMEOUT_S = 0.3  # client timeout; a "timeout" fault sleeps longer
SLOW_S = 0.6


def _answer(prompt):
  return f"ANSWER<{prompt}>"


class FakeServer:
  """An OpenAI-compatible /chat/completions stub with a fault plan per prompt.

  ``faults[prompt]`` is a list consumed one entry per request for that prompt: "timeout", "500",
  "429:<retry-after>", "badjson", "nofield", "empty", "401"; then requests succeed with
  ``_answer(prompt)``.
  """

  def __init__(self, delay_s=0.0):
    self.faults = {}
    self.requests = []  # dicts: prompt, system, time, fault
    self.problems = []  # protocol violations seen by the server
    self.delay_s = delay_s
    self.inflight = 0
    self.max_inflight = 0
    self.lock = threading.Lock()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        pass

      def _send(self, status, body, headers=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
          self.send_response(status)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(data)))
          for k, v in headers:
            self.send_header(k, v)
          self.end_headers()
          self.wfile.write(data)
        except OSError:  # the client gave up (timeout fault)
          pass

      def do_POST(self):  # pylint: disable=invalid-name
        with server.lock:
          server.inflight += 1
          server.max_inflight = max(server.max_inflight, server.inflight)
        try:
          self._handle()
        finally:
          with server.lock:
            server.inflight -= 1

      def _handle(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        msgs = body.get("messages", [])
        prompt = msgs[-1]["content"] if msgs and msgs[-1].get("role") == "user" else None
        system = msgs[0]["content"] if len(msgs) == 2 and msgs[0]["role"] == "system" else None
        problems = []
        if self.path != "/v1/chat/completions":
          problems.append(f"path {self.path}")
        if self.headers.get("Authorization") != f"Bearer {KEY}":
          problems.append("authorization")
        if body.get("temperature") != 0 or body.get("model") != "fake-model":
          problems.append(f"temperature/model {body.get('temperature')} {body.get('model')}")
        if not isinstance(body.get("max_tokens"), int) or prompt is None:
          problems.append("max_tokens/messages")
        with server.lock:
          plan = server.faults.get(prompt) or []
          fault = plan.pop(0) if plan else None
          server.requests.append(
              {"prompt": prompt, "system": system, "time": time.monotonic(), "fault": fault})
          server.problems.extend(problems)
        if problems:
          self._send(400, {"error": {"message": "; ".join(problems)}})
        elif fault == "timeout":
          time.sleep(SLOW_S)
          self._send(200, {"choices": [{"message": {"content": "too late"}}]})
        elif fault == "500":
          self._send(500, {"error": {"message": "internal error"}})
        elif fault and fault.startswith("429:"):
          self._send(429, {"error": {"message": "rate limited"}},
                     [("Retry-After", fault.split(":", 1)[1])])
        elif fault == "badjson":
          self._send(200, b'{"choices": [ not json')
        elif fault == "nofield":
          self._send(200, {"choices": [{"message": {"role": "assistant"}}]})
        elif fault == "empty":
          self._send(200, {"choices": [{"message": {"content": "  "}}]})
        elif fault == "401":  # like real APIs, echo the key it was given
          self._send(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}})
        else:
          if server.delay_s:
            time.sleep(server.delay_s)
          self._send(200, {"choices": [{"index": 0, "message": {
              "role": "assistant", "content": _answer(prompt)}}]})

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                   daemon=True)
    self.thread.start()

  def asked(self, prompt=None):
    with self.lock:
      return [r for r in self.requests if prompt is None or r["prompt"] == prompt]

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  s = FakeServer()
  yield s
  s.close()
  assert not s.problems, s.problems


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
  monkeypatch.setenv(ENV, KEY)


class SleepRecorder:

  def __init__(self):
    self.sleeps = []
    self.lock = threading.Lock()

  def __call__(self, s):
    with self.lock:
      self.sleeps.append(s)


def _client(server, tmp_path, **kw):
  args = dict(model="fake-model", api_key_env=ENV, timeout_s=TIMEOUT_S, max_retries=3,
              backoff_base_s=0.001, backoff_max_s=0.01, concurrency=4,
              cache_dir=str(tmp_path / "cache"), progress=False)
  args.update(kw)
  return llm.ChatClient(server.base_url, **args)


def _cache_files(tmp_path):
  root = tmp_path / "cache"
  return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# ----------------------------------------------------------------------------------------------
# Client.


def test_answers_in_order_duplicates_asked_once(server, tmp_path):
  c = _client(server, tmp_path)
  ps = ["b", "a", "c", "a", "b"]
  assert c.complete_many(ps) == [_answer(p) for p in ps]
  assert sorted(r["prompt"] for r in server.asked()) == ["a", "b", "c"]
  assert all(r["system"] is None for r in server.asked())
  # One file per prompt at cache_dir/<key[:2]>/<key>.json, no temporary files left.
  files = _cache_files(tmp_path)
  assert len(files) == 3
  for p in "abc":
    key = c.cache_key(p)
    path = tmp_path / "cache" / key[:2] / f"{key}.json"
    assert path in files
    assert json.loads(path.read_text())["answer"] == _answer(p)
  assert c.complete("c") == _answer("c") and len(server.asked()) == 3


def test_retries_each_fault_then_succeeds(server, tmp_path, caplog):
  caplog.set_level(std_logging.DEBUG)
  server.faults = {"t": ["timeout"], "r": ["429:7"], "f": ["500", "500"], "j": ["badjson"],
                   "n": ["nofield"], "e": ["empty"], "ok": []}
  rec = SleepRecorder()
  c = _client(server, tmp_path, sleep=rec, concurrency=8)
  ps = ["t", "r", "f", "j", "n", "e", "ok"]
  start = time.monotonic()
  assert c.complete_many(ps) == [_answer(p) for p in ps]
  assert time.monotonic() - start < SLOW_S + 2.0
  counts = {p: len(server.asked(p)) for p in ps}
  assert counts == {"t": 2, "r": 2, "f": 3, "j": 2, "n": 2, "e": 2, "ok": 1}
  # 429's Retry-After is honoured as given; the other sleeps are the (tiny) exponential backoff.
  assert sorted(rec.sleeps)[-1] == 7.0
  assert len(rec.sleeps) == 7 and all(s <= 0.01 for s in sorted(rec.sleeps)[:-1])
  assert "retry" in caplog.text and "HTTP 500" in caplog.text and "not JSON" in caplog.text


def test_backoff_is_exponential_with_jitter(server, tmp_path):
  server.faults = {"x": ["500"] * 5}
  rec = SleepRecorder()
  c = _client(server, tmp_path, sleep=rec, max_retries=5, backoff_base_s=0.1, backoff_max_s=1.0,
              rng=random.Random(0))
  assert c.complete("x") == _answer("x")
  assert len(rec.sleeps) == 5
  for k, s in enumerate(rec.sleeps):
    cap = min(1.0, 0.1 * 2 ** k)
    assert 0.5 * cap <= s <= cap, (k, s)
  assert rec.sleeps[3] > rec.sleeps[0] * 2  # grows: >= 0.4 vs <= 0.1
  assert rec.sleeps[4] <= 1.0  # capped (0.1 * 16 = 1.6 > 1.0)


def test_backoff_real_sleep_timestamps(server, tmp_path):
  server.faults = {"x": ["500"] * 3}
  c = _client(server, tmp_path, max_retries=3, backoff_base_s=0.04, backoff_max_s=1.0)
  assert c.complete("x") == _answer("x")
  times = [r["time"] for r in server.asked("x")]
  gaps = [b - a for a, b in zip(times, times[1:])]
  for k, g in enumerate(gaps):
    assert g >= 0.5 * 0.04 * 2 ** k - 0.005, (k, gaps)
  assert gaps[2] > gaps[0]


def test_retries_exhausted_names_key_and_last_failure(server, tmp_path):
  server.faults = {"bad": ["500"] * 10}
  c = _client(server, tmp_path, sleep=SleepRecorder(), max_retries=2)
  with pytest.raises(llm.LLMRetriesExhausted) as info:
    c.complete("bad")
  msg = str(info.value)
  assert c.cache_key("bad") in msg and "HTTP 500" in msg and "3 attempts" in msg
  assert len(server.asked("bad")) == 3
  assert c.cached("bad") is None and not _cache_files(tmp_path)


def test_timeouts_exhausted(server, tmp_path):
  server.faults = {"slow": ["timeout"] * 3}
  c = _client(server, tmp_path, sleep=SleepRecorder(), max_retries=1)
  with pytest.raises(llm.LLMRetriesExhausted, match="timed out"):
    c.complete("slow")
  assert len(server.asked("slow")) == 2


def test_401_fails_fast_and_key_never_leaks(server, tmp_path, caplog):
  caplog.set_level(std_logging.DEBUG)
  server.faults = {"p1": ["500", "badjson"], "denied": ["401"]}
  c = _client(server, tmp_path, sleep=SleepRecorder(), concurrency=1)
  assert c.complete("p1") == _answer("p1")
  with pytest.raises(llm.LLMRequestError) as info:
    c.complete_many(["denied", "p2"])
  assert info.value.status == 401
  msg = str(info.value)
  assert "401" in msg and "Incorrect API key provided" in msg and "[REDACTED]" in msg
  assert len(server.asked("denied")) == 1  # no retry
  assert not server.asked("p2")  # concurrency 1: cancelled before it started
  assert "retry" in caplog.text  # the logs were captured, so the check below means something
  for text in [msg, repr(info.value), repr(c), caplog.text] + [
      p.read_text() for p in _cache_files(tmp_path)]:
    assert KEY not in text
  assert _cache_files(tmp_path)  # p1 is cached (and checked above)
  assert not [k for k in vars(c).values() if isinstance(k, str) and KEY in k]


def test_missing_key_names_variable_and_sends_nothing(server, tmp_path, monkeypatch):
  c = _client(server, tmp_path)
  assert c.complete("cached") == _answer("cached")
  monkeypatch.delenv(ENV)
  assert c.complete("cached") == _answer("cached")  # fully cached: no key needed
  with pytest.raises(llm.LLMConfigError, match=ENV):
    c.complete("new")
  assert len(server.asked()) == 1


def test_second_run_makes_zero_requests(server, tmp_path):
  ps = [f"p{i}" for i in range(6)]
  assert _client(server, tmp_path).complete_many(ps) == [_answer(p) for p in ps]
  n = len(server.asked())
  assert n == 6
  again = _client(server, tmp_path)  # a new process, same cache_dir
  assert again.complete_many(list(reversed(ps))) == [_answer(p) for p in reversed(ps)]
  assert len(server.asked()) == n
  # Another model or temperature is another key.
  assert _client(server, tmp_path, model="fake-model").cache_key("p0") == again.cache_key("p0")
  assert llm.ChatClient(server.base_url, "other", cache_dir=str(tmp_path)).cache_key("p0") != (
      again.cache_key("p0"))
  assert again.cache_key("p0", system="s") != again.cache_key("p0")


def test_run_stopped_part_way_resumes_with_missing_only(server, tmp_path):
  ps = [f"p{i}" for i in range(6)]
  server.faults = {"p3": ["500"] * 100}
  c = _client(server, tmp_path, sleep=SleepRecorder(), max_retries=1, concurrency=1)
  with pytest.raises(llm.LLMRetriesExhausted):
    c.complete_many(ps)
  assert [r["prompt"] for r in server.asked()] == ["p0", "p1", "p2", "p3", "p3"]
  assert len(_cache_files(tmp_path)) == 3
  server.faults.clear()
  before = len(server.asked())
  c2 = _client(server, tmp_path, concurrency=2)
  assert c2.complete_many(ps) == [_answer(p) for p in ps]
  assert sorted(r["prompt"] for r in server.asked()[before:]) == ["p3", "p4", "p5"]


def test_concurrency_is_bounded(tmp_path):
  s = FakeServer(delay_s=0.05)
  try:
    # A generous timeout: on a loaded machine a 0.3 s timeout can expire, and the retry would
    # overlap the abandoned request still held by the server, over-counting in-flight requests.
    c = _client(s, tmp_path, concurrency=3, timeout_s=10.0)
    ps = [f"q{i}" for i in range(9)]
    assert c.complete_many(ps) == [_answer(p) for p in ps]
    assert 1 <= s.max_inflight <= 3
  finally:
    s.close()
  assert not s.problems


def test_corrupt_cache_file_is_asked_again(server, tmp_path):
  c = _client(server, tmp_path)
  c.complete("z")
  (path,) = _cache_files(tmp_path)
  path.write_text("{truncated")
  assert c.complete("z") == _answer("z")
  assert len(server.asked("z")) == 2


def test_parse_retry_after():
  assert llm.parse_retry_after(None) is None
  assert llm.parse_retry_after("3") == 3.0
  assert llm.parse_retry_after("-1") == 0.0
  assert llm.parse_retry_after("garbage") is None
  now = 1_700_000_000.0
  date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
  assert abs(llm.parse_retry_after(date, now=now) - 30.0) < 1e-6


# ----------------------------------------------------------------------------------------------
# Summaries and prompts.

ITEMS = [
    {"title": "Silk Shampoo", "brand": "Acme", "categories": "Beauty > Hair Care > Shampoos",
     "price": "12.99", "description": "Gentle. " * 100},
    {"title": "Red Lipstick", "brand": "", "categories": "Beauty > Makeup > Lips", "price": "",
     "description": ""},
]


def test_offline_mode_makes_no_requests(server, tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("network used in offline mode")

  monkeypatch.setattr(urllib.request, "urlopen", no_network)
  items = llm.summarise_items(ITEMS, "beauty product")
  assert items[0].startswith("Title: Silk Shampoo; Categories: Beauty > Hair Care > Shampoos; "
                             "Brand: Acme; Price: 12.99; Description: Gentle.")
  assert items[0].endswith("...") and items[1] == (
      "Title: Red Lipstick; Categories: Beauty > Makeup > Lips")
  users = llm.summarise_users([["Silk Shampoo", "Red Lipstick"], []], "beauty product")
  assert users == ["The user bought: Silk Shampoo; Red Lipstick", "The user bought nothing yet."]
  assert not server.asked() and not _cache_files(tmp_path)


def test_summaries_with_client_send_paper_prompts(server, tmp_path):
  c = _client(server, tmp_path)
  hist = [[["Conditioner", "Silk Shampoo"]], None]
  got = llm.summarise_items(ITEMS, "beauty product", client=c, histories=hist)
  sent = server.asked()
  assert got == [_answer(prompts.item_user_prompt(f, "beauty product", history=h))
                 for f, h in zip(ITEMS, hist)]
  assert {r["system"] for r in sent} == {
      "Assume you are a beauty products recommendation expert."}
  assert "[Conditioner -> Silk Shampoo] #" in sent[0]["prompt"] + sent[1]["prompt"]
  titles = [["A", "B"], ["C"]]
  got = llm.summarise_users(titles, "beauty product", client=c)
  assert got == [_answer("<A>; <B>"), _answer("<C>")]
  assert server.asked()[-1]["system"] == prompts.user_system_prompt("beauty product")
  with pytest.raises(ValueError):
    llm.summarise_users([[]], "beauty product", client=c)


def test_user_prompt_matches_paper_beauty_wording():
  paper = ("Assume you are a beauty products recommendation expert.\n"
           "You will be provided with a user's historical purchases of beauty products in "
           "chronological order, given in the following format:\n"
           "<The title of item1>; <The title of item2>; <The title of item3>;... \n"
           "Please summarize the user's specific preference when purchasing beauty products. "
           "Note that your response should be a coherent paragraph of no more than 100 words.\n")
  assert prompts.user_system_prompt("beauty product") == paper
  titles = [f"t{i}" for i in range(25)]
  text = prompts.user_prompt(titles, "toy")
  assert text.startswith("Assume you are a toys recommendation expert.\n")
  assert text.endswith("<t5>; <t6>; " + "; ".join(f"<t{i}>" for i in range(7, 25)))
  assert "<t4>" not in text  # only the 20 most recent
  assert prompts.user_template_text(titles, max_items=3) == "The user bought: t22; t23; t24"


def test_item_prompt_wording():
  text = prompts.item_prompt(ITEMS[1], "beauty product")
  assert text.startswith("Assume you are a beauty products recommendation expert.\n\n")
  assert ("The beauty product name is Red Lipstick; brand is missing; categories are Beauty > "
          "Makeup > Lips; price is missing; The detailed description of the beauty product is "
          "missing......") in text
  assert "bought this beauty product:  [None] . Here, different sequences" in text
  assert "Please do not generally say makeup enthusiasts" in text
  assert '"item summary": "A description of the item, no more than 80 words."' in text
  movie = prompts.item_prompt({"movie_title": "Heat", "genre": "Crime", "release_year": "1995"},
                              "movie")
  assert "The movie name is Heat; brand is missing; categories are Crime; release_year is 1995" in (
      movie)
  assert "Please do not generally say movie enthusiasts" in movie
  assert prompts.item_system_prompt("office product") == (
      "Assume you are an office products recommendation expert.")
