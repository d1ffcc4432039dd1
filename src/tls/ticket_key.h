// A session ticket key as plain data (tls/ticket.h seals tickets with it):
// carried by the hot-restart handoff (handoff/codec.h) without the TLS
// library's headers.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

namespace baton::tls {

using TicketKey = std::array<uint8_t, 32>;

// Most ticket keys a server keeps (configured first, then inherited).
constexpr size_t kMaxTicketKeys = 8;

}  // namespace baton::tls
