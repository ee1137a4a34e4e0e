"""Answer extraction and verification.

Public API: `extract_boxed` (the first box: what a judge is shown), `extract_boxes` (every box), `is_correct`,
`Verifier` (verify / verify_batch -> Verdict), `VerifyRequest`, `choice_label`, and the Vision-SR1 perception
reward in `spark_megatron.verify.perception`. The rule the verifier applies is written in `verify.verifier`.
"""
from spark_megatron.verify.choice import choice_label, ground_truth_choice
from spark_megatron.verify.equivalence import CheckResult, check, is_correct, normalize_answer
from spark_megatron.verify.extraction import contains_box, extract_boxed, extract_boxes
from spark_megatron.verify.pool import PoolResult, TimeoutPool
from spark_megatron.verify.verifier import Verifier, VerifyRequest, combine_reward, format_score

__all__ = [
    "CheckResult", "PoolResult", "TimeoutPool", "Verifier", "VerifyRequest", "check", "choice_label",
    "combine_reward", "contains_box", "extract_boxed", "extract_boxes", "format_score", "ground_truth_choice", "is_correct",
    "normalize_answer",
]
