//! `vpnlb gateway-check`: what DSR or decap needs on a gateway host (filled in by the gateway-check work).
