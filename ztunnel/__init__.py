"""ztunnel for Python: Istio's ambient-mesh node proxy."""

__version__ = "0.1.0"
