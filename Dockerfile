# One image for the API and both kinds of worker.
#   CPU (default):  docker build -t synthray .
#   GPU workers:    docker build --build-arg TORCH_SPEC="torch>=2.4" -t synthray:gpu .
# (PyPI's default Linux torch wheels are CUDA builds; the CPU default keeps the API
# image small.)
FROM python:3.11-slim AS base

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SYNTHRAY_DATA_DIR=/var/lib/synthray

RUN useradd --system --uid 10001 --home-dir /var/lib/synthray synthray \
    && mkdir -p /var/lib/synthray /import \
    && chown synthray /var/lib/synthray

WORKDIR /opt/synthray
# Every Python package from the hashed runtime lock (scripts/lock.sh): exactly the locked files or
# the build fails. The CPU build of torch has its own locked file; a GPU image installs
# TORCH_SPEC from PyPI instead (its CUDA libraries are then not hash-checked).
COPY requirements ./requirements
RUN if [ "$TORCH_SPEC" = "torch==2.13.0" ]; then \
        pip install --require-hashes --no-deps --extra-index-url "$TORCH_INDEX" \
            -r requirements/torch-cpu.txt -r requirements/runtime.txt; \
    else \
        pip install --require-hashes --no-deps -r requirements/runtime.txt \
        && pip install "$TORCH_SPEC"; \
    fi
COPY pyproject.toml README.md ./
COPY synthray ./synthray
RUN pip install --no-deps --no-build-isolation . && pip check

USER synthray
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)" || exit 1
ENTRYPOINT ["synthray"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--no-with-worker"]
