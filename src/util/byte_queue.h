// ByteQueue: a FIFO of bytes stored in a list of chunks.
//
// Why chunks: appending never moves bytes already queued, so a span returned
// by front() stays valid (and can sit in a pending uv_write) until those bytes
// are dropped with pop(). An empty queue owns no memory, which keeps idle
// tunnels small: buffers exist only while data is in flight.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace baton::util {

class ByteQueue {
 public:
  static constexpr size_t kChunk = 16 * 1024;
  // Capacity of pooled chunks: a 16 KiB chunk, or one whole TLS record
  // (16 KiB plaintext + header, nonce and tag).
  static constexpr size_t kStandardCap = kChunk + 64;

  ByteQueue() = default;
  ~ByteQueue() { clear(); }
  ByteQueue(ByteQueue&& o) noexcept : head_(o.head_), tail_(o.tail_), size_(o.size_) {
    o.head_ = o.tail_ = nullptr;
    o.size_ = 0;
  }
  ByteQueue& operator=(ByteQueue&& o) noexcept {
    if (this != &o) {
      clear();
      head_ = o.head_; tail_ = o.tail_; size_ = o.size_;
      o.head_ = o.tail_ = nullptr;
      o.size_ = 0;
    }
    return *this;
  }
  ByteQueue(const ByteQueue& other) { append(other); }
  ByteQueue& operator=(const ByteQueue& other) {
    if (this != &other) { clear(); append(other); }
    return *this;
  }

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

  // Copies `data` to the back.
  void append(std::span<const uint8_t> data);
  void append(const ByteQueue& other);

  // Reserves up to `want` (at least 1) writable bytes at the back and returns
  // them; the caller writes into the span and then calls commit(n) with the
  // number of bytes it actually wrote (n <= span size). Nothing else may touch
  // the queue between the two calls.
  std::span<uint8_t> prepare(size_t want);
  void commit(size_t n);
  // Like prepare(), but the span is exactly `n` contiguous bytes (a new chunk
  // is started if the last one has less room).
  std::span<uint8_t> prepare_contiguous(size_t n);

  // The first contiguous run of queued bytes (empty span if the queue is empty).
  std::span<const uint8_t> front() const;
  // Up to `max` spans covering the queue from the front, for writev-style I/O.
  size_t front_spans(std::span<std::span<const uint8_t>> out) const;

  // Copies up to out.size() bytes from the front without dropping them; returns how many.
  size_t peek(std::span<uint8_t> out) const;
  // Drops n bytes from the front (n <= size()).
  void pop(size_t n);
  void clear();

  // All bytes as one vector (for state export and tests).
  std::vector<uint8_t> to_vector() const;

 private:
  // One allocation per chunk: header followed by `cap` bytes. An empty queue
  // is three words and owns nothing.
  struct Chunk {
    Chunk* next;
    uint32_t cap;
    uint32_t begin;  // first unread byte
    uint32_t end;    // one past the last written byte
    uint8_t* data() { return reinterpret_cast<uint8_t*>(this + 1); }
    const uint8_t* data() const { return reinterpret_cast<const uint8_t*>(this + 1); }
  };
  void pop_chunk();
  void push_chunk(size_t cap);
  Chunk* head_ = nullptr;
  Chunk* tail_ = nullptr;
  size_t size_ = 0;
};

}  // namespace baton::util
