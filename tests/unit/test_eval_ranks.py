"""The command protocol between rank 0 and the other ranks of an evaluation job (eval/ranks.py), with follower
ranks as threads and an in-memory control channel: every rank receives the same batches (self-reflection rounds
included), prompts the engine cannot render never reach the engines, a batch of only such prompts involves no
other rank, a job that never needed its engines stops cleanly, and a failed engine call sends nothing more.
The real collectives (vLLM engines, gloo) are covered by tests/e2e/test_eval.py."""
from __future__ import annotations

import queue
import threading

import pytest

from spark_megatron.eval import ranks
from spark_megatron.eval.generation import Generation
from spark_megatron.rollout.layout import rollout_layout, split_prompts
from spark_megatron.types import Prompt, Rollout, RolloutGroup

pytestmark = pytest.mark.unit


class Channel:
    """Control for one rank of an in-memory job: rank 0's sends reach every follower's queue in order."""

    def __init__(self, rank: int, world: int, inboxes: list, reports: queue.Queue):
        self.rank, self.world, self.inboxes, self.reports = rank, world, inboxes, reports
        self.sent = []

    def send(self, command):
        self.sent.append(command[0])
        for q in self.inboxes[1:]:
            q.put(command)

    def receive(self):
        return self.inboxes[self.rank].get(timeout=10)

    def gather(self, report):
        if self.rank != 0:
            self.reports.put((self.rank, report))
            return None
        got = dict(self.reports.get(timeout=10) for _ in range(self.world - 1))
        return [report] + [got[r] for r in range(1, self.world)]


class Renderer:
    def render(self, p):
        if "LONG" in p.messages[-1]["content"]:
            raise ValueError(f"prompt '{p.uid}': too long")
        return p


class FakeFleet:
    """Records what this rank's engine part was asked; rank 0 answers every prompt ('echo: <content>')."""

    def __init__(self, rank: int, world: int, log: list):
        self.layout = rollout_layout(world, 1, 1, 1, on_gpu=False)
        self.rank, self.index, self.log = rank, rank, log
        self.label, self.is_engine_leader = self.layout.label(rank), True
        self.engine = type("Engine", (), {"renderer": Renderer()})()
        self.calls, self.closed = [], False

    def generate(self, prompts, spec):
        start, stop = split_prompts(len(prompts), self.layout.engines)[self.index]
        self.calls.append(("generate", stop - start))
        self.log.append((self.rank, [p.messages[-1]["content"] for p in prompts]))
        if self.rank == 0 and any("FAIL" in p.messages[-1]["content"] for p in prompts):
            raise RuntimeError("engine failed")
        if self.rank != 0:
            return None
        return [RolloutGroup(p, [Rollout(p, [1], [1, 2], "echo: " + p.messages[-1]["content"])]) for p in prompts]

    def shutdown(self):
        self.closed = True


def _job(world: int, monkeypatch):
    log, fleets = [], {}

    def build(engine_cfg, decoding, hf_dir, rank, world_):
        fleets[rank] = FakeFleet(rank, world_, log)
        return fleets[rank]

    monkeypatch.setattr(ranks, "build_eval_fleet", build)
    monkeypatch.setattr(ranks, "engine_choice", lambda engine_cfg, hf_dir: ("vllm", "float32"))
    monkeypatch.setattr(ranks, "eval_layout", lambda engine_cfg, world_, name: None)
    inboxes, reports = [queue.Queue() for _ in range(world)], queue.Queue()
    results = {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(
        r, ranks.follow(Channel(r, world, inboxes, reports)))) for r in range(1, world)]
    for t in threads:
        t.start()
    return ranks.FleetGenerator(Channel(0, world, inboxes, reports)), threads, results, log, fleets


def _prompts(*texts):
    return [Prompt(uid=f"p{i}", messages=[{"role": "user", "content": t}], ground_truth="")
            for i, t in enumerate(texts)]


def test_every_rank_gets_the_same_batches_and_reports_its_share(monkeypatch):
    from spark_megatron.eval.suite import DecodingConfig, EngineConfig

    lead, threads, results, log, fleets = _job(3, monkeypatch)
    gen = lead.generator("/hf", EngineConfig(), DecodingConfig())
    out = gen(_prompts("a", "LONG b", "c", "d", "e"))
    assert [g.text for g in out] == ["echo: a", "", "echo: c", "echo: d", "echo: e"]
    assert out[1] == Generation("", 0, "error", "prompt 'p1': too long")
    assert gen(_prompts("LONG x", "LONG y")) == [Generation("", 0, "error", f"prompt 'p{i}': too long")
                                                 for i in range(2)]  # nothing served: no rank involved
    gen(_prompts("judge: echo: a"))  # a follow-up round built from earlier responses
    gen.close()
    gen.close()  # idempotent
    for t in threads:
        t.join(timeout=10)
    by_rank = {r: [texts for rank, texts in log if rank == r] for r in range(3)}
    assert by_rank[0] == by_rank[1] == by_rank[2] == [["a", "c", "d", "e"], ["judge: echo: a"]]
    assert gen.control.sent == ["build", "generate", "generate", "stop"]
    # 4 prompts over 3 engines: 2, 1, 1; then 1, 0, 0
    assert [(r["label"], r["prompts"], r["calls"]) for r in gen.reports] == \
        [("rollout engine 0 (rank 0)", 3, 2), ("rollout engine 1 (rank 1)", 1, 2), ("rollout engine 2 (rank 2)", 1, 2)]
    assert results[1]["prompts"] == 1 and all(f.closed for f in fleets.values())


def test_a_job_that_never_needed_its_engines_stops_cleanly(monkeypatch):
    lead, threads, results, log, fleets = _job(2, monkeypatch)
    lead.close()  # e.g. a finished OUT re-summarised, or a bad --model refused on rank 0
    threads[0].join(timeout=10)
    assert not threads[0].is_alive() and results == {1: None} and fleets == {} and lead.reports is None


def test_after_a_failed_engine_call_nothing_more_is_sent(monkeypatch):
    from spark_megatron.eval.suite import DecodingConfig, EngineConfig

    lead, threads, results, log, fleets = _job(2, monkeypatch)
    gen = lead.generator("/hf", EngineConfig(), DecodingConfig())
    with pytest.raises(RuntimeError, match="engine failed"):
        gen(_prompts("FAIL"))
    gen.close()  # the launcher ends the job; a 'stop' now could meet a rank inside a collective
    assert lead.broken and lead.reports is None and not fleets[0].closed
    assert lead.control.sent == ["build", "generate"]
    lead.control.inboxes[1].put(("stop",))  # end the follower thread (in a real job: the launcher kills it)
    threads[0].join(timeout=10)
