//! Header lengths, EtherTypes and IP protocol numbers, defined once for every stage (the shared
//! protocol numbers UDP/TCP/ESP are `vpnlb_common::PROTO_*`).

/// Ethernet header without / with one 802.1Q tag.
pub const ETH_LEN: usize = 14;
pub const VLAN_ETH_LEN: usize = 18;
/// IPv4 header without options; the fixed IPv6 header.
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
/// The IPv6 Fragment header (next header 44).
pub const FRAG_HDR_LEN: usize = 8;
/// UDP header; also the GUE encapsulation's UDP header (GUE variant 1 has no header of its own).
pub const UDP_LEN: usize = 8;
/// TCP header without options.
pub const TCP_LEN: usize = 20;
/// ESP header: SPI and sequence number.
pub const ESP_LEN: usize = 8;
/// ICMP / ICMPv6 header before the quoted packet.
pub const ICMP_LEN: usize = 8;

/// EtherTypes as read from the wire into a native u16 (network order in memory).
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6_BE: u16 = 0x86DDu16.to_be();
pub const ETH_P_8021Q_BE: u16 = 0x8100u16.to_be();
pub const ETH_P_8021AD_BE: u16 = 0x88a8u16.to_be();

/// IP protocol numbers besides UDP/TCP/ESP: ICMP, ICMPv6 (PMTU messages), the IPv6 Fragment
/// header, and the encapsulations' IPv4-in-IP and IPv6-in-IP.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_FRAGMENT: u8 = 44;
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_IPV6: u8 = 41;
