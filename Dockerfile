# micronet on a CUDA-enabled PyTorch image. The locked dependencies (uv.lock: torch 2.13.0 CUDA build,
# torchvision 0.28.0, ...) go into /opt/micronet/.venv with uv; the default command runs the root pipeline.
#   docker build -t micronet .
#   docker run --gpus all --ipc=host -v $PWD/data:/opt/micronet/data -v $PWD/mlflow.db:/opt/micronet/mlflow.db micronet
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV UV_PYTHON_DOWNLOADS=never \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends git make && rm -rf /var/lib/apt/lists/* \
    && python -m pip install --no-cache-dir uv

WORKDIR /opt/micronet
# Dependencies first (cached layer), then the project itself.
COPY pyproject.toml uv.lock README.md .python-version ./
RUN uv sync --frozen --no-dev --no-install-project --python "$(command -v python)"
COPY . .
RUN uv sync --frozen --no-dev --python "$(command -v python)"
# DVC works inside a Git repository; the build context leaves .git out, so start a fresh one.
RUN git init -q && git config user.email micronet@localhost && git config user.name micronet

ENV PATH=/opt/micronet/.venv/bin:$PATH
CMD ["dvc", "repro"]
