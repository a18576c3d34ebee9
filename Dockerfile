# slimdeploy on an NVIDIA GPU with TensorRT. It cannot be built on the project's CPU build
# machines (no Docker engine there), so it is kept minimal; see README "Docker (GPU)".
#
#   docker build -t slimdeploy .
#   docker run --gpus all --rm -v "$PWD":/work slimdeploy
#
# The NVIDIA PyTorch container ships CUDA, PyTorch, torchvision and TensorRT; the pinned lock adds
# everything else, except the packages the container provides and the CPU-only ONNX Runtime,
# which is replaced by its GPU build (the two must never be installed together).
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /opt/slimdeploy
COPY requirements.txt .
RUN grep -v -E '^(torch|torchvision|onnxruntime)==' requirements.txt > requirements-container.txt \
 && pip install --no-cache-dir -r requirements-container.txt onnxruntime-gpu==1.31.1 \
 && git config --system --add safe.directory /work

ENV DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
WORKDIR /work
# The repository is mounted at /work. One DVC experiment with the GPU target: training on CUDA,
# latency table and pruning measured with TensorRT (fp16), engine built with TensorRT.
CMD ["dvc", "exp", "run", \
     "-S", "train.device=cuda", "-S", "target.device=cuda", "-S", "target.backend=tensorrt", \
     "-S", "target.precision=fp16", "-S", "engine.backend=tensorrt", "-S", "engine.precision=fp16"]
