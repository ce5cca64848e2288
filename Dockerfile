# Loom GPU image: Ray's CUDA base image (Python 3.11) with the pinned stack and Loom installed.
#
#   docker build -t loom .
#   docker run --rm --gpus all -v "$PWD/examples:/jobs" loom plan /jobs/medical-unimed.yaml
#   docker run --rm --gpus all --entrypoint python loom -m bench.gpu          # the GPU path, checked (bench/gpu)
#
# Ray tags read <ray version>-py<python>-cu<cuda>; pick the CUDA variant your driver supports.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

# Where torch comes from. Empty: PyPI's Linux wheel, which is a CUDA build bundling its own CUDA
# runtime. Or a PyTorch index for another CUDA version, e.g. https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX_URL=""
ARG TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /home/ray/loom

# torch first and on its own, so that the CUDA build is the one `pip install .` later keeps
# (pyproject.toml pins the same version).
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi \
    && python -c "import torch; assert torch.version.cuda, 'expected a CUDA build of torch, got CPU-only'"

# Then the rest of the pinned stack and Loom itself (ray 2.60.0 is already in the base image).
COPY --chown=ray:users . .
RUN pip install ".[test]" \
    && python -c "import torch; assert torch.version.cuda" \
    && loom --version \
    && loom validate examples/medical-unimed.yaml

ENTRYPOINT ["loom"]
CMD ["--help"]
