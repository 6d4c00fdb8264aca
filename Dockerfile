# autogpt-ws, the drop-in replacement for AutoGPT's websocket_server.
#
#   docker build -t autogpt-ws .
#   docker run --rm -p 8001:8001 -e ENABLE_AUTH=false autogpt-ws autogpt-ws --demo
#
# Configuration comes from the environment only (docs/operations.md, "Configuration");
# no config.yaml is read unless AUTOGPT_WS_CONFIG names one.  BASE_IMAGE may
# name any Debian-like image with Python >= 3.11 (python3 and its venv module),
# the same one for both stages.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/autogpt-ws
COPY setup.cfg setup.py README.md /src/
COPY autogpt_ws /src/autogpt_ws
COPY twisted /src/twisted
COPY deploy/healthcheck.py /opt/autogpt-ws/healthcheck.py
# psycopg (the sharded bus's execution lookup) is a core dependency in
# setup.cfg; naming it here as well installs nothing more.  Then the
# installers go (nothing is built at run time), and Twisted's plugin cache is
# written now, since the running user cannot write into the venv.
RUN /opt/autogpt-ws/bin/pip install /src "psycopg[binary]>=3.1" \
 && /opt/autogpt-ws/bin/pip uninstall -y -q pip setuptools wheel \
 && /opt/autogpt-ws/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && /opt/autogpt-ws/bin/autogpt-ws --help > /dev/null

FROM ${BASE_IMAGE}
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin autogpt-ws \
 && mkdir /srv/autogpt-ws
COPY --from=build /opt/autogpt-ws /opt/autogpt-ws
# An empty working directory: no stray ./config.yaml is ever picked up.
WORKDIR /srv/autogpt-ws
# shutdown_timeout 8 s: the drain (close every socket 1001, wait, abort the
# rest) ends before the default stop grace of docker and compose (10 s, then
# SIGKILL).  With a longer grace (stop_grace_period), raise both together.
ENV PATH=/opt/autogpt-ws/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AUTOGPT_WS_SHUTDOWN_TIMEOUT=8
# numeric, so Kubernetes' runAsNonRoot can verify it (the user is autogpt-ws)
USER 10001:10001
EXPOSE 8001
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/opt/autogpt-ws/bin/python", "/opt/autogpt-ws/healthcheck.py"]
CMD ["autogpt-ws"]
