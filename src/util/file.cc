#include "util/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace baton::util {

namespace {

void zero(void* p, size_t n) {
  if (n == 0) return;
  std::memset(p, 0, n);
  asm volatile("" : : "r"(p) : "memory");  // keep the stores (the buffer is freed or reused next)
}

const char* kind_of(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISSOCK(m)) return "a socket";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  return "not a regular file";
}

std::string size_text(size_t n) {
  if (n >= (1u << 20) && n % (1u << 20) == 0) return std::to_string(n >> 20) + " MiB";
  if (n >= 1024 && n % 1024 == 0) return std::to_string(n >> 10) + " KiB";
  return std::to_string(n) + " bytes";
}

}  // namespace

void wipe(std::vector<unsigned char>& v) {
  zero(v.data(), v.size());
  v.clear();
}

void wipe(std::string& s) {
  zero(s.data(), s.size());
  s.clear();
}

std::string read_regular_file(const std::string& path, size_t max_bytes, std::vector<unsigned char>& out) {
  wipe(out);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) return std::string("cannot open it: ") + std::strerror(errno);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    std::string e = std::string("cannot read it: ") + std::strerror(errno);
    ::close(fd);
    return e;
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return S_ISDIR(st.st_mode) ? "is a directory, not a file" : std::string("is ") + kind_of(st.st_mode) + ", not a regular file";
  }
  if (st.st_size < 0 || uint64_t(st.st_size) > max_bytes) {
    ::close(fd);
    return "is larger than " + size_text(max_bytes) + "; is this the right file?";
  }
  // One allocation of the size fstat saw (+1 to see the end at once); a file
  // that grows meanwhile is read into a bigger buffer and the old one zeroed.
  std::vector<unsigned char> buf(size_t(st.st_size) + 1);
  size_t have = 0;
  std::string problem;
  for (;;) {
    if (have == buf.size()) {
      if (buf.size() > max_bytes) {
        problem = "is larger than " + size_text(max_bytes) + "; is this the right file?";
        break;
      }
      std::vector<unsigned char> bigger(buf.size() * 2);
      std::memcpy(bigger.data(), buf.data(), have);
      wipe(buf);
      buf.swap(bigger);
    }
    ssize_t n = ::read(fd, buf.data() + have, buf.size() - have);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      problem = std::string("cannot read it: ") + std::strerror(errno);
      break;
    }
    if (n == 0) break;
    have += size_t(n);
  }
  ::close(fd);
  if (problem.empty() && have > max_bytes) problem = "is larger than " + size_text(max_bytes) + "; is this the right file?";
  if (!problem.empty()) {
    wipe(buf);
    return problem;
  }
  // Shrink in place (no reallocation: resize down keeps the buffer).
  zero(buf.data() + have, buf.size() - have);
  buf.resize(have);
  out.swap(buf);
  return "";
}

}  // namespace baton::util
