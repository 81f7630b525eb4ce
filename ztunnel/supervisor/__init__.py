"""The supervisor process: control plane clients, admin runtime, worker management."""
