from twisted.application.service import ServiceMaker

natkeep = ServiceMaker(
    "natkeep", "natkeep.tap", "SIP registrar with NAT keep-alive heartbeats", "natkeep"
)
