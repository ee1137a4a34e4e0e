"""The evaluation loop: pending items of each dataset, batch by batch, generate -> score -> append to items.jsonl.

Engine-agnostic: it calls a Generator (see generation.py), built lazily so that a finished OUT re-summarises
without loading a model. Items already in items.jsonl are never generated or scored again.
"""
from __future__ import annotations

from typing import Callable, Optional

from spark_megatron.eval import scoring
from spark_megatron.eval.generation import Generator, messages_key, text_generate
from spark_megatron.eval.items import prompt_hash
from spark_megatron.eval.output import OutputDir
from spark_megatron.eval.report import summarize, table
from spark_megatron.verify import VerifyRequest


class Evaluation:
    def __init__(self, suite, loaded: dict, out: OutputDir, make_generator: Callable[[], Generator], verifier,
                 model: str = "", progress: bool = True):
        """`loaded`: dataset name -> LoadedDataset; `make_generator` is called once, when the first batch needs
        generating."""
        self.suite, self.loaded, self.out, self.verifier = suite, loaded, out, verifier
        self.make_generator, self.model, self.progress = make_generator, model, progress
        self._generator: Optional[Generator] = None

    @property
    def generator(self) -> Generator:
        if self._generator is None:
            self._generator = self.make_generator()
        return self._generator

    def run(self) -> dict:
        rows = self.out.rows()
        done = {(r["dataset"], r["id"]) for r in rows}
        totals = {s.name: len(self.loaded[s.name].items) for s in self.suite.datasets}
        counts = {name: sum(1 for d, _ in done if d == name) for name in totals}
        bar = self._bar(sum(totals.values()), len(done), counts, totals)
        size = self.suite.engine.batch_size
        try:
            for spec in self.suite.datasets:
                pending = [it for it in self.loaded[spec.name].items if (spec.name, it.id) not in done]
                for start in range(0, len(pending), size):
                    new = self.score(spec, pending[start:start + size])
                    self.out.append(new)
                    rows.extend(new)
                    counts[spec.name] += len(new)
                    if bar is not None:
                        bar.update(len(new))
                        bar.set_postfix_str(_counts_text(counts, totals))
        finally:
            if bar is not None:
                bar.close()
        reports = {name: ld.report.as_dict() for name, ld in self.loaded.items()}
        summary = summarize(rows, self.suite, reports, self.model)
        self.out.write_summary(summary, table(summary))
        return summary

    def _bar(self, total: int, initial: int, counts: dict, totals: dict):
        if not self.progress:
            return None
        from tqdm import tqdm

        bar = tqdm(total=total, initial=initial, desc="eval", unit="item", dynamic_ncols=True)
        bar.set_postfix_str(_counts_text(counts, totals))
        return bar

    # ------------------------------------------------------------------------------------------ scoring
    def score(self, spec, items: list) -> list:
        if spec.kind == "judgment":
            return self._judgments(spec, items)
        if self.suite.self_reflection.enabled:
            return self._answers_with_reflection(spec, items)
        return self._answers(spec, items)

    def _row(self, spec, item) -> dict:
        truth = item.prompt.ground_truth if not hasattr(item, "chosen") else None
        return {"dataset": spec.name, "id": item.id, "kind": spec.kind, "subset": item.subset,
                "prompt_hash": prompt_hash(item), "ground_truth": truth}

    def _verdicts(self, items: list, texts: list) -> list:
        return self.verifier.verify_batch([VerifyRequest(t, it.prompt.ground_truth) for it, t in zip(items, texts)])

    def _answers(self, spec, items: list) -> list:
        gens = self.generator([it.prompt for it in items])
        rows = []
        for it, g, v in zip(items, gens, self._verdicts(items, [g.text for g in gens])):
            ok = scoring.answer_correct(it, v, g.text)
            rows.append(self._row(spec, it) | {
                "response": g.text, "extracted": v.extracted, "correct": ok, "first_correct": ok, "rounds": 0,
                "tokens": g.tokens, "finish_reason": g.finish_reason, "error": g.error or None})
        return rows

    def _answers_with_reflection(self, spec, items: list) -> list:
        from spark_megatron.recycle.self_reflection import self_reflect

        log: dict = {}
        sr = self.suite.self_reflection
        results = self_reflect([it.prompt for it in items], text_generate(self.generator, log),
                               max_rounds=sr.max_rounds, judge_template=self.suite.judge_template)
        first = self._verdicts(items, [r.trace[0].text for r in results])
        final = self._verdicts(items, [r.final_text for r in results])
        rows = []
        for it, r, v1, v2 in zip(items, results, first, final):
            gens = [log[messages_key(step.messages)] for step in r.trace]
            rows.append(self._row(spec, it) | {
                "response": r.final_text, "extracted": v2.extracted,
                "correct": scoring.answer_correct(it, v2, r.final_text),
                "first_response": r.trace[0].text, "first_extracted": v1.extracted,
                "first_correct": scoring.answer_correct(it, v1, r.trace[0].text), "rounds": r.retries,
                "accepted": r.accepted, "tokens": sum(g.tokens for g in gens),
                "error": next((g.error for g in gens if g.error), None)})
        return rows

    def _judgments(self, spec, items: list) -> list:
        per_item = [scoring.judge_requests(it, spec.judge_mode, self.suite.judge_template, self.suite.seed)
                    for it in items]
        gens = iter(self.generator([r.prompt for reqs in per_item for r in reqs]))
        rows = []
        for it, reqs in zip(items, per_item):
            got = [next(gens) for _ in reqs]
            outcome = scoring.judgment_outcome(it, reqs, [g.text for g in got], self.verifier)
            rows.append(self._row(spec, it) | {
                "response": [g.text for g in got], "extracted": [j["verdict"] for j in outcome["judgments"]],
                "correct": outcome["correct"], "first_correct": outcome["correct"], "rounds": 0,
                "tokens": sum(g.tokens for g in got), "judgments": outcome["judgments"],
                "unparsable": outcome["unparsable"], "tie": outcome["tie"],
                "error": next((g.error for g in got if g.error), None)})
        return rows


def _counts_text(counts: dict, totals: dict) -> str:
    return " | ".join(f"{name} {counts[name]}/{totals[name]}" for name in totals)

