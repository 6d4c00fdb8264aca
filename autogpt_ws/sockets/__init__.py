"""The socket side: the Autobahn protocol and factory, authentication at the upgrade, what a
socket writes and its bounds, one write per turn, permessage-deflate."""
