"""
natkeep: a SIP registrar that keeps its devices' NAT mappings open with
server-side UDP heartbeats, paced by the VOS3000 C{SS_SIP_NAT_KEEP_ALIVE_*}
parameters.
"""

__version__ = "0.1.0"


def build() -> str:
    """
    How this copy of natkeep runs its hot path: C{"mypyc"} when the wire
    and the controllers were compiled at install, C{"python"} when they
    were not (see C{setup.py}).
    """
    from importlib.util import find_spec

    spec = find_spec("natkeep.sip")
    origin = spec.origin if spec is not None else None
    return "python" if origin is None or origin.endswith(".py") else "mypyc"
