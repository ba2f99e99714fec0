//! strongSwan IKEv2 gateways and clients in network namespaces (filled in by the IPsec e2e work).
