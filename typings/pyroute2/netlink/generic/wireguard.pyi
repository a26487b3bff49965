from pyroute2.netlink import nlmsg

WG_CMD_GET_DEVICE: int
WG_CMD_SET_DEVICE: int
WG_GENL_VERSION: int
WGDEVICE_F_REPLACE_PEERS: int
WGPEER_F_REPLACE_ALLOWEDIPS: int

class wgmsg(nlmsg): ...
