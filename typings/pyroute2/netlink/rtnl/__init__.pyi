# The rtnetlink multicast group masks supervisor.net.monitor subscribes to.
RTMGRP_LINK: int
RTMGRP_IPV4_IFADDR: int
RTMGRP_IPV6_IFADDR: int
RTMGRP_IPV4_ROUTE: int
RTMGRP_IPV6_ROUTE: int
RTMGRP_IPV4_RULE: int
RTMGRP_IPV6_RULE: int
RTMGRP_NEIGH: int
RTMGRP_TC: int
