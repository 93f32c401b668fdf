"""The gateway's routes, by what they serve: inference, adapters, tenants, operations. Each module is a
mixin of the Gateway deployment (serve/gateway.py), whose __init__ sets the state they use."""
