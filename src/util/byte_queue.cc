#include "util/byte_queue.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

namespace baton::util {

namespace {
// Recently freed standard chunks, reused before asking malloc. Streaming
// allocates and frees a chunk per 16 KiB; without this, glibc trims and
// re-grows the heap and every chunk costs page faults. Bounded: at most
// kCacheMax chunks (~1 MiB) per thread stay cached.
constexpr size_t kCacheMax = 64;
// Under AddressSanitizer (make asan, the fuzz targets) every chunk goes back
// to malloc: a read after pop() is then reported, not served from a
// recycled chunk.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kRecycle = false;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kRecycle = false;
#else
constexpr bool kRecycle = true;
#endif
#else
constexpr bool kRecycle = true;
#endif
struct ChunkCache {
  void* slots[kCacheMax];
  size_t n = 0;
  ~ChunkCache() {
    while (n) std::free(slots[--n]);
  }
};
thread_local ChunkCache g_cache;
}  // namespace

void ByteQueue::append(std::span<const uint8_t> data) {
  while (!data.empty()) {
    auto room = prepare(data.size());
    size_t n = std::min(room.size(), data.size());
    std::memcpy(room.data(), data.data(), n);
    commit(n);
    data = data.subspan(n);
  }
}

void ByteQueue::append(const ByteQueue& other) {
  for (const Chunk* c = other.head_; c; c = c->next) append({c->data() + c->begin, size_t(c->end - c->begin)});
}

std::span<uint8_t> ByteQueue::prepare(size_t want) {
  if (want == 0) want = 1;
  if (tail_ && tail_->end < tail_->cap) return {tail_->data() + tail_->end, std::min<size_t>(want, tail_->cap - tail_->end)};
  // Small writes into an empty queue get a small chunk so that a queue holding
  // a few bytes (a control message, a partial record header) stays cheap.
  size_t cap = want >= kChunk || size_ > 0 ? kChunk : std::max<size_t>(want, 256 - sizeof(Chunk));
  push_chunk(cap);
  return {tail_->data(), std::min(want, cap)};
}

std::span<uint8_t> ByteQueue::prepare_contiguous(size_t n) {
  if (tail_ && tail_->cap - tail_->end >= n) return {tail_->data() + tail_->end, n};
  push_chunk(std::max(n, size_ > 0 ? kChunk : std::min(n, kChunk)));
  return {tail_->data(), n};
}

void ByteQueue::push_chunk(size_t cap) {
  void* mem = nullptr;
  if (cap >= kChunk && cap <= kStandardCap && g_cache.n) {
    mem = g_cache.slots[--g_cache.n];
    cap = kStandardCap;
  } else if (cap >= kChunk && cap <= kStandardCap) {
    cap = kStandardCap;
  }
  if (!mem) mem = std::malloc(sizeof(Chunk) + cap);
  if (!mem) throw std::bad_alloc();
  Chunk* c = new (mem) Chunk{nullptr, uint32_t(cap), 0, 0};
  if (tail_) tail_->next = c; else head_ = c;
  tail_ = c;
}

void ByteQueue::commit(size_t n) {
  tail_->end += uint32_t(n);
  size_ += n;
  if (size_ == 0) clear();
}

std::span<const uint8_t> ByteQueue::front() const {
  if (!head_) return {};
  return {head_->data() + head_->begin, size_t(head_->end - head_->begin)};
}

size_t ByteQueue::front_spans(std::span<std::span<const uint8_t>> out) const {
  size_t i = 0;
  for (const Chunk* c = head_; c && i < out.size(); c = c->next)
    if (c->end > c->begin) out[i++] = {c->data() + c->begin, size_t(c->end - c->begin)};
  return i;
}

size_t ByteQueue::peek(std::span<uint8_t> out) const {
  size_t done = 0;
  for (const Chunk* c = head_; c && done < out.size(); c = c->next) {
    size_t n = std::min<size_t>(out.size() - done, c->end - c->begin);
    std::memcpy(out.data() + done, c->data() + c->begin, n);
    done += n;
  }
  return done;
}

void ByteQueue::pop_chunk() {
  Chunk* c = head_;
  head_ = c->next;
  if (!head_) tail_ = nullptr;
  if (kRecycle && c->cap == kStandardCap && g_cache.n < kCacheMax) g_cache.slots[g_cache.n++] = c;
  else std::free(c);
}

void ByteQueue::pop(size_t n) {
  size_ -= n;
  while (n > 0) {
    size_t take = std::min<size_t>(n, head_->end - head_->begin);
    head_->begin += uint32_t(take);
    n -= take;
    if (head_->begin == head_->end) pop_chunk();
  }
  if (size_ == 0) clear();
}

void ByteQueue::clear() {
  while (head_) pop_chunk();
  size_ = 0;
}

std::vector<uint8_t> ByteQueue::to_vector() const {
  std::vector<uint8_t> v(size_);
  peek(v);
  return v;
}

}  // namespace baton::util
