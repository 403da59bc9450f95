"""The numbers on the wire, declared once: Ethertypes, protocol numbers, ICMP types, TCP
flag bits and option kinds. Each group cites the header or RFC it comes from; the parser
(:mod:`.headers`), the builders (:mod:`.build`) and everything above them read them here.
"""

from __future__ import annotations

# -- Ethernet (include/uapi/linux/if_ether.h) ------------------------------------------------
ETH_ALEN = 6
ETH_HLEN = 14  # destination MAC, source MAC, Ethertype
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100  # IEEE 802.1Q VLAN tag (C-tag)
ETH_P_8021AD = 0x88A8  # IEEE 802.1ad service tag (S-tag, the outer tag of QinQ)
#: Tag protocol identifiers: each tag is 4 bytes (TPID, TCI) before the next Ethertype.
VLAN_TPIDS = frozenset((ETH_P_8021Q, ETH_P_8021AD))
VLAN_HLEN = 4

# -- ARP (RFC 826; include/uapi/linux/if_arp.h) ------------------------------------------------
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2

# -- IP protocol numbers (IANA; include/uapi/linux/in.h, in6.h) --------------------------------
IPPROTO_HOPOPTS = 0
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_ICMPV6 = 58
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136
#: IPv6 extension headers with the (next header, length in 8-octet units - 1) layout (RFC
#: 8200 section 4; 135 Mobility RFC 6275, 139 HIP RFC 7401, 140 Shim6 RFC 5533). The
#: fragment header (44) is a fixed 8 bytes. A walk stops at ESP (50), AH (51) and No Next
#: Header (59), as scapy's decode does, so that ``TCP in packet`` gives scapy's answer.
IPV6_EXT_HEADERS = frozenset((IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS, 135, 139, 140))
#: Transport protocols whose header starts with the source and destination ports.
PORT_PROTOS = frozenset((IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_UDPLITE))
PROTO_NAMES: dict[int | None, str] = {
    IPPROTO_ICMP: "icmp",
    IPPROTO_TCP: "tcp",
    IPPROTO_UDP: "udp",
    IPPROTO_ICMPV6: "icmpv6",
}

# -- IPv4 (RFC 791) and IPv6 (RFC 8200) -----------------------------------------------------------
IPV4_HLEN = 20  # without options
IPV6_HLEN = 40
IP_DF = 0x4000  # flags/fragment-offset word: don't fragment
IP_MF = 0x2000  # more fragments
IP_OFFSET = 0x1FFF  # the fragment offset, in 8-byte units
IPV4_MIN_MTU = 68  # RFC 791: every IPv4 module must forward a 68-byte datagram
IPV6_MIN_MTU = 1280  # RFC 8200 section 5
DEFAULT_TTL = 64  # Linux's net.ipv4.ip_default_ttl and IPv6 hop limit

#: The ECN field, the two low bits of IPv4 TOS / IPv6 traffic class (RFC 3168 section 5).
ECN_NOT_ECT, ECN_ECT1, ECN_ECT0, ECN_CE = 0, 1, 2, 3
ECN_NAMES = ("not-ect", "ect1", "ect0", "ce")

# -- ICMP (RFC 792, RFC 1191; include/uapi/linux/icmp.h) ----------------------------------------
ICMP_DEST_UNREACH = 3
ICMP_HOST_UNREACH = 1  # codes of ICMP_DEST_UNREACH
ICMP_PORT_UNREACH = 3
ICMP_FRAG_NEEDED = 4
#: Error types: no ICMP error is ever sent about one of these (RFC 1122 3.2.2).
ICMP_ERRORS = frozenset((3, 4, 5, 11, 12))

# -- ICMPv6 (RFC 4443, RFC 4861; include/uapi/linux/icmpv6.h) ------------------------------------
ICMPV6_DEST_UNREACH = 1
ICMPV6_PKT_TOOBIG = 2
ICMPV6_ADDR_UNREACH = 3  # codes of ICMPV6_DEST_UNREACH
ICMPV6_PORT_UNREACH = 4
#: Error types (RFC 4443 2.1: types below 128); none is answered with an error (2.4 (e)).
ICMPV6_ERRORS = frozenset((1, 2, 3, 4))
ND_NEIGHBOR_SOLICIT = 135  # RFC 4861 4.3
ND_NEIGHBOR_ADVERT = 136  # RFC 4861 4.4
ND_OPT_SOURCE_LINKADDR = 1  # RFC 4861 4.6.1
ND_OPT_TARGET_LINKADDR = 2

# -- TCP (RFC 9293 3.1; RFC 3168 for ECE/CWR, RFC 3540 for NS) ------------------------------------
TCP_HLEN = 20  # without options
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80
TCP_NS = 0x100  # the low bit of byte 12 (RFC 3540, historic)
#: Flag letters in bit order, as scapy writes them (``str(TCP(flags="SA").flags) == "SA"``).
TCP_FLAG_LETTERS = "FSRPAUECN"

# TCP option kinds (IANA "TCP Option Kind Numbers"; RFC 9293 3.2, RFC 7323, RFC 2018).
TCPOPT_EOL = 0
TCPOPT_NOP = 1
TCPOPT_MSS = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERM = 4
TCPOPT_SACK = 5
TCPOPT_TIMESTAMP = 8
TCP_MAX_OPTIONS = 40  # the data offset's 4 bits: 60-byte header, 20 of them fixed
