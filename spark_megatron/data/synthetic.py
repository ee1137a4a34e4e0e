"""`synthetic:arith`: a seeded, verifiable toy task (small integer arithmetic) for the CPU quickstart.
(`synthetic:shapes`, the image task for tiny VL runs, is in synthetic_vision.py.)

Spec: `synthetic:arith[?n=512&max=9&ops=+-&seed=0&negative=0]`. Single-digit a + b and a - b by default, with
a >= b for subtraction unless negative=1, so a tiny model can learn a useful part of it in a few hundred steps.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, fields
from urllib.parse import parse_qsl

from spark_megatron.data.records import DataError
from spark_megatron.types import Prompt

PREFIX = "synthetic:arith"

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_QUESTION = "What is {a} {op} {b}? Put the final answer in \\boxed{{}}."


@dataclass(frozen=True)
class ArithSpec:
    n: int = 512
    """Number of prompts."""
    max: int = 9
    """Operands are drawn from 0..max."""
    ops: str = "+-"
    """Operators to use, any of + - *."""
    seed: int = 0
    negative: int = 0
    """1 allows a - b < 0; 0 orders the operands so differences are >= 0."""


def parse_query(spec: str, prefix: str, spec_cls) -> dict:
    """`<prefix>?k=v&...` -> keyword arguments of the dataclass `spec_cls` (int fields parsed as integers);
    DataError naming the spec for a wrong prefix, unknown keys or bad values."""
    if not spec.startswith(prefix) or spec[len(prefix):][:1] not in ("", "?"):
        raise DataError(f"{spec}: not a {prefix} spec")
    known = {f.name: f.type for f in fields(spec_cls)}
    kwargs = {}
    # a literal '+' is an operator here, not a form-encoded space
    for key, value in parse_qsl(spec[len(prefix) + 1:].replace("+", "%2B"), keep_blank_values=True):
        if key not in known:
            raise DataError(f"{spec}: unknown option '{key}' (known: {', '.join(known)})")
        try:
            kwargs[key] = int(value) if known[key] in (int, "int") else value
        except ValueError:
            raise DataError(f"{spec}: option '{key}' expects an integer, got {value!r}") from None
    return kwargs


def parse_spec(spec: str) -> ArithSpec:
    """`synthetic:arith?n=64&ops=+` -> ArithSpec; DataError for unknown keys or bad values."""
    kwargs = parse_query(spec, PREFIX, ArithSpec)
    parsed = ArithSpec(**kwargs)
    if parsed.n < 1 or parsed.max < 0 or not parsed.ops or any(o not in _OPS for o in parsed.ops):
        raise DataError(f"{spec}: need n >= 1, max >= 0 and ops from '+-*'")
    return parsed


def arith_prompts(spec: str = PREFIX) -> list:
    """The prompts of a synthetic spec; identical for identical specs (seeded, no global RNG)."""
    cfg = parse_spec(spec)
    rng = random.Random(cfg.seed)
    prompts = []
    for i in range(cfg.n):
        op = cfg.ops[rng.randrange(len(cfg.ops))]
        a, b = rng.randint(0, cfg.max), rng.randint(0, cfg.max)
        if op == "-" and not cfg.negative and a < b:
            a, b = b, a
        text = _QUESTION.format(a=a, op=op, b=b)
        prompts.append(Prompt(uid=f"{PREFIX}:{i}", messages=[{"role": "user", "content": text}],
                              ground_truth=str(_OPS[op](a, b))))
    return prompts
