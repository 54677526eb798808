"""
natkeep: a SIP registrar that keeps its devices' NAT mappings open with
server-side UDP heartbeats, paced by the VOS3000 C{SS_SIP_NAT_KEEP_ALIVE_*}
parameters.
"""

__version__ = "0.1.0"
