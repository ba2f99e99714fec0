//! OpenVPN gateways and clients in network namespaces (filled in by the OpenVPN e2e work).
