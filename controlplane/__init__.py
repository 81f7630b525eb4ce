"""A small local Istio control plane: delta xDS and the Istio CA, fed by LOCAL_XDS-style YAML."""
