"""Plain-text rendering of a PlanReport (fixed-width tables: readable in a terminal, a log and a README)."""
from __future__ import annotations

from spark_megatron.launch.planner import GIB, PlanReport


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f}"


def _table(header: list, rows: list) -> list:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(header), line] + [fmt(r) for r in rows]


def _stage_rows(r: PlanReport) -> list:
    keys = [("parameters (elements)", lambda s: f"{s.params:,}"),
            ("decoder layers", lambda s: str(s.layers)),
            ("params GiB", lambda s: _gib(s.param_bytes)),
            ("grads (fp32) GiB", lambda s: _gib(s.grad_bytes)),
            ("master params GiB", lambda s: _gib(s.master_param_bytes)),
            ("Adam m+v GiB", lambda s: _gib(s.adam_bytes)),
            ("reference model GiB", lambda s: _gib(s.reference_bytes)),
            ("resident total GiB", lambda s: _gib(s.resident_bytes)),
            (f"activations GiB (x{'/'.join(str(s.inflight_microbatches) for s in r.stages)} mb)",
             lambda s: _gib(s.activation_bytes)),
            ("logits GiB", lambda s: _gib(s.logits_bytes))]
    if r.fp8:
        keys.append(("fp8 weight copies GiB", lambda s: _gib(s.fp8_weight_bytes)))
    return [[name] + [fn(s) for s in r.stages] for name, fn in keys]


def format_report(r: PlanReport) -> str:
    lay = r.layout
    size = f"{r.total_params / 1e9:.2f} B" if r.total_params >= 1e8 else f"{r.total_params / 1e6:.2f} M"
    out = [f"model        {r.architecture} ({size} params) from {r.model_source}",
           f"layout       {lay.world} GPUs: actor TP {lay.tp} x PP {lay.pp} x DP {lay.dp}"
           f"{f' (VPP {lay.vpp})' if lay.vpp else ''}; vLLM {lay.engines} engine(s) x TP {lay.rollout_tp} "
           f"(colocated)",
           f"engines      {lay.rollout.describe()}",
           f"precision    params {r.params_dtype}, grads fp32, fp8 {r.fp8 or 'off'}; layer spec {r.layer_spec}",
           f"sequence     {r.seq_len} tokens x micro-batch {r.micro_batch_size}; {lay.microbatches} micro-batches "
           "per optimizer step per DP rank", ""]
    header = ["per GPU"] + [f"stage {s.pp_rank} (dp {s.dp_rank})" for s in r.stages]
    out += _table(header, _stage_rows(r)) + [""]
    ro = r.rollout
    out += [f"vLLM per GPU  share {ro.share_bytes / GIB:.2f} GiB = weights {ro.weight_bytes / GIB:.2f} GiB + KV cache "
            f"{ro.kv_cache_bytes / GIB:.2f} GiB ({ro.kv_tokens:,} tokens per engine = {ro.sequences_at_max_len} "
            f"sequences of {r.seq_len})",
            f"weight push   {r.sync.model_bytes / GIB:.2f} GiB of weights into each of {lay.engines} engine(s) per "
            f"push; each GPU receives at most {r.sync.max_received_bytes / GIB:.2f} GiB "
            f"({r.sync.max_received_bytes / max(r.sync.model_bytes, 1):.2f}x the model; "
            f"{r.sync.block_bytes / GIB:.2f} GiB travel as per-rank blocks); bucket {r.sync.bucket_bytes >> 20} MiB "
            f"+ staging {r.sync.staging_bytes >> 20} MiB", ""]
    rows = [[p.phase, "vLLM" if p.pp_rank < 0 else str(p.pp_rank), _gib(p.bytes),
             _gib(p.bytes + r.overhead_bytes)] for p in r.phases]
    out += _table(["phase", "stage", "GiB", "+overhead GiB"], rows) + [""]
    pk = r.peak
    verdict = "fits" if r.fits else "DOES NOT FIT"
    out.append(f"peak         {r.peak_bytes / GIB:.2f} GiB ({pk.phase}, stage {pk.pp_rank}) of "
               f"{r.gpu_memory_bytes / GIB:.2f} GiB per GPU incl. {r.overhead_bytes / GIB:.1f} GiB overhead: {verdict}")
    out += [f"note         {n}" for n in r.notes]
    return "\n".join(out)
