"""The I/O-free core: configuration, model, state, routing, rbac, codecs. No sockets, no clocks."""
