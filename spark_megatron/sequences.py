"""Rollout groups -> training sequences (GRPO advantages on every response token) and per-kind metrics."""
from __future__ import annotations

import torch

from spark_megatron.algo import ADVANTAGE_ESTIMATORS, compute_advantages
from spark_megatron.types import RolloutGroup, TaskKind
from spark_megatron.verify.perception import perception_metrics

_JUDGE_KINDS = (TaskKind.POINTWISE, TaskKind.PAIRWISE)


class SequenceBuilder:
    """Turns verified RolloutGroups into the actor's `SequenceSample`s.

    VL: `image_preprocessor` (spark_megatron.vision.ImagePreprocessor, configured from the checkpoint) prepares
    each prompt's images once per `build` call; every rollout of the group, and any other prompt of the batch
    showing the same file at the same pixel bounds, gets the same PreparedImage objects, so the actor's image
    cache encodes them once. The rollout's prompt ids must hold each image's pads already expanded to the same
    token count (the actor checks and names the sequence otherwise).
    """

    def __init__(self, tokenizer, algo_cfg, rollout_cfg, image_preprocessor=None):
        self.tokenizer, self.algo, self.rollout = tokenizer, algo_cfg, rollout_cfg
        ADVANTAGE_ESTIMATORS.get(algo_cfg.adv_estimator)  # an unknown algorithm.adv_estimator fails here, named
        self.image_preprocessor = image_preprocessor
        self._vision_ids = None

    def prepared_images(self, prompt, memo: dict) -> list:
        """The prompt's ImageRefs -> PreparedImages (None without images or without a preprocessor)."""
        if not prompt.images or self.image_preprocessor is None:
            return None
        out = []
        for ref in prompt.images:
            key = (ref.path, ref.min_pixels, ref.max_pixels)
            if key not in memo:
                memo[key] = self.image_preprocessor.prepare(ref.path, min_pixels=ref.min_pixels,
                                                            max_pixels=ref.max_pixels)
            out.append(memo[key])
        return out

    def _trainable_response(self, rollout) -> tuple:
        """(response ids, rollout logprobs or None). VL models: a response is cut before the first vision
        placeholder token (engines suppress them; an engine that does not would otherwise make the actor embed
        an image inside the response)."""
        ids, lps = list(rollout.response_token_ids), list(rollout.logprobs) if rollout.logprobs else None
        if self.image_preprocessor is not None:
            if self._vision_ids is None:
                from spark_megatron.vision.tokens import vision_token_ids

                self._vision_ids = set(vision_token_ids(self.tokenizer)) if self.tokenizer is not None else set()
            cut = next((i for i, t in enumerate(ids) if t in self._vision_ids), len(ids))
            ids, lps = ids[:cut], (lps[:cut] if lps is not None else None)
        return ids, lps

    def advantages(self, groups: list) -> list:
        """One [n] advantage tensor per group (groups may differ in size when some rollouts failed), from the
        estimator named by algorithm.adv_estimator."""
        out = []
        for g in groups:
            rewards = torch.tensor([g.rewards], dtype=torch.float64)  # [1, n]
            adv = compute_advantages(rewards, self.algo)
            out.append(adv[0].float())
        return out

    def build(self, groups: list) -> list:
        from spark_megatron.train.batching import SequenceSample

        seqs, memo = [], {}
        for g, adv in zip(groups, self.advantages(groups)):
            images = self.prepared_images(g.prompt, memo)
            for r, a in zip(g.rollouts, adv.tolist()):
                response, logprobs = self._trainable_response(r)
                if not response:
                    continue  # nothing to train on; the group statistics above still counted it
                seqs.append(SequenceSample(
                    tokens=list(r.prompt_token_ids) + response, prompt_len=len(r.prompt_token_ids),
                    advantages=[a] * len(response), rollout_logprobs=logprobs, kind=g.prompt.kind.value,
                    images=images))
        return seqs

    def sft(self, prompt_ids: list, response_ids: list, kind: str = "sft", prompt=None) -> "SequenceSample":
        """A supervised sequence for the warm-up: advantage 1 on every response token. With `prompt` (VL), its
        images are prepared and the chat template's single <|image_pad|> per image is expanded to the image's
        token count, as a rollout engine's prompt ids are."""
        from spark_megatron.train.batching import SequenceSample
        from spark_megatron.vision import expand_image_pads

        images = self.prepared_images(prompt, {}) if prompt is not None else None
        if images:
            pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
            prompt_ids = expand_image_pads(list(prompt_ids), images, pad, record=f"prompt '{prompt.uid}'")
        return SequenceSample(tokens=list(prompt_ids) + list(response_ids), prompt_len=len(prompt_ids),
                              advantages=[1.0] * len(response_ids), kind=kind, images=images)


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def group_metrics(groups: list, prefix: str = "") -> dict:
    """Accuracy per task kind (policy, judge = pointwise+pairwise, reflection), lengths, all-same groups, and the
    Vision-SR1 perception metrics where rollouts have them."""
    by_kind: dict = {}
    for g in groups:
        by_kind.setdefault(g.prompt.kind, []).append(g)
    out = {}

    def acc(gs):
        return _mean([float(c) for g in gs for c in g.correct])

    if TaskKind.POLICY in by_kind:
        gs = by_kind[TaskKind.POLICY]
        out[f"{prefix}policy/accuracy"] = acc(gs)
        out[f"{prefix}policy/solve_all_frac"] = _mean([float(all(g.correct)) for g in gs])
        out[f"{prefix}policy/solve_none_frac"] = _mean([float(not any(g.correct)) for g in gs])
        out[f"{prefix}rollout/response_len"] = _mean([len(r.response_token_ids) for g in gs for r in g.rollouts])
        out[f"{prefix}rollout/truncated_frac"] = _mean([float(r.finish_reason == "length")
                                                        for g in gs for r in g.rollouts])
    judge = [g for k in _JUDGE_KINDS for g in by_kind.get(k, [])]
    if judge:
        out[f"{prefix}judge/accuracy"] = acc(judge)
        out[f"{prefix}judge/num_tasks"] = len(judge)
    for kind in (TaskKind.POINTWISE, TaskKind.PAIRWISE, TaskKind.REFLECTION):
        if kind in by_kind:
            out[f"{prefix}{kind.value}/accuracy"] = acc(by_kind[kind])
    out.update({prefix + k: v for k, v in perception_metrics(groups).items()})
    return out


__all__ = ["SequenceBuilder", "group_metrics", "RolloutGroup"]
