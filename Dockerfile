# ztunnel for Python: the node-proxy image for helm/ztunnel.
#
#   docker build -t ztunnel-python:0.1.0 .
#
# The chart runs the container as root (uid 0, gid 1337) with a read-only root filesystem and
# an emptyDir on /tmp, so nothing here may need to write outside /tmp at run time:
#   - bytecode is compiled by pip at install time and never written afterwards
#     (PYTHONDONTWRITEBYTECODE=1);
#   - the supervisor's runtime dir (ZeroMQ ipc sockets) comes from tempfile, under /tmp;
#   - the FAKE_CA development root defaults to /tmp/ztunnel-fake-ca.
# No iproute2/iptables: ztunnel never shells out. Traffic redirection is set up by istio-cni
# inside each pod's network namespace; ztunnel only receives the namespace over ZDS.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# `ztunnel version` reports these.
ARG GIT_REVISION=unknown
ENV ZTUNNEL_BUILD_GIT_REVISION=${GIT_REVISION}

# Install the project from the source tree (wheels only for the runtime dependencies: no
# compiler in the image), then drop the sources.
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir . \
    && cd / \
    && rm -rf /src

# Upstream's default paths are relative (./var/run/secrets/tokens/istio-token,
# ./var/run/secrets/istio/root-cert.pem, ./etc/istio/config/mesh): they resolve from /.
WORKDIR /

# Metrics 15020 and readiness 15021 (the only ports reached from outside the pod network
# namespace); the proxy listeners live inside each captured pod's namespace.
EXPOSE 15020 15021

# Root, as the chart's securityContext (runAsUser 0) expects: setns and the capabilities it
# adds need it.
USER 0:0

ENTRYPOINT ["ztunnel"]
CMD ["proxy", "ztunnel"]
