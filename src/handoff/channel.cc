#include "handoff/channel.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace baton::handoff {

namespace {
constexpr size_t kReadChunk = 256 * 1024;
}

Channel* Channel::create(uv_loop_t* loop, int fd, OnMessage on_message, OnClosed on_closed) {
  int fl = fcntl(fd, F_GETFL);
  if (fl >= 0) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  auto* c = new Channel(fd, std::move(on_message), std::move(on_closed));
  uv_poll_init(loop, &c->poll_, fd);
  c->poll_.data = c;
  c->update_events();
  return c;
}

bool Channel::peer_uid(uint32_t& uid, int& pid) const {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (getsockopt(fd_, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return false;
  uid = cred.uid;
  pid = cred.pid;
  return true;
}

void Channel::update_events() {
  if (closed_) return;
  int want = UV_READABLE | (out_.empty() ? 0 : UV_WRITABLE);
  if (want == events_) return;
  events_ = want;
  uv_poll_start(&poll_, want, poll_cb);
}

void Channel::send(std::vector<uint8_t> bytes, std::vector<int> fds) {
  if (closed_ || !deferred_error_.empty()) return;
  out_bytes_ += bytes.size();
  out_.push_back(Out{std::move(bytes), std::move(fds), 0});
  do_write(true);
  update_events();
}

void Channel::poll_cb(uv_poll_t* p, int status, int events) {
  auto* c = static_cast<Channel*>(p->data);
  if (c->closed_) return;
  if (!c->deferred_error_.empty()) {
    c->fail_after_reading(c->deferred_error_);
    return;
  }
  if (status < 0) {
    c->fail_after_reading(std::string("handoff socket error: ") + uv_strerror(status));
    return;
  }
  if (events & UV_WRITABLE) c->do_write();
  if (!c->closed_ && (events & UV_READABLE)) c->do_read();
  c->update_events();
}

void Channel::do_write(bool from_send) {
  while (!closed_ && !out_.empty()) {
    Out& o = out_.front();
    iovec iov{o.bytes.data() + o.offset, o.bytes.size() - o.offset};
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerMessage)];
    if (o.offset == 0 && !o.fds.empty()) {
      size_t n = o.fds.size();
      mh.msg_control = control;
      mh.msg_controllen = CMSG_SPACE(sizeof(int) * n);
      cmsghdr* cm = CMSG_FIRSTHDR(&mh);
      cm->cmsg_level = SOL_SOCKET;
      cm->cmsg_type = SCM_RIGHTS;
      cm->cmsg_len = CMSG_LEN(sizeof(int) * n);
      std::memcpy(CMSG_DATA(cm), o.fds.data(), sizeof(int) * n);
    }
    ssize_t w = sendmsg(fd_, &mh, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EAGAIN || errno == EINTR) return;
      if (from_send) {
        // Reported on the next loop iteration: a broken socket polls as
        // writable (or with an error) at once.
        deferred_error_ = std::string("handoff socket write: ") + std::strerror(errno);
        events_ = 0;  // make update_events() re-arm the poll
        return;
      }
      fail_after_reading(std::string("handoff socket write: ") + std::strerror(errno));
      return;
    }
    o.offset += size_t(w);
    out_bytes_ -= size_t(w);
    if (o.offset == o.bytes.size()) out_.pop_front();
  }
  if (out_.empty() && close_when_sent_) close();
}

void Channel::do_read() {
  // Back to the loop as soon as a read has delivered a message: a message
  // that arrives while this one is handled waits for the next poll, so that
  // whatever that poll also brings (a SIGTERM, a drain) is seen between the
  // two. (Reading on to EAGAIN let a whole handoff, server state to commit,
  // run inside one callback while a signal waited behind it.)
  const uint64_t delivered_before = delivered_;
  for (int round = 0; round < 64 && !closed_ && (delivered_ == delivered_before || reading_rest_); ++round) {
    size_t at = in_.size();
    in_.resize(at + kReadChunk);
    iovec iov{in_.data() + at, kReadChunk};
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerMessage)];
    mh.msg_control = control;
    mh.msg_controllen = sizeof control;
    ssize_t r = recvmsg(fd_, &mh, MSG_CMSG_CLOEXEC);
    if (r < 0) {
      in_.resize(at);
      if (errno == EAGAIN || errno == EINTR) return;
      fail(std::string("handoff socket read: ") + std::strerror(errno));
      return;
    }
    in_.resize(at + size_t(r));
    uint64_t end = in_base_ + in_.size();
    for (cmsghdr* cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
      if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
      size_t n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < n; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
        in_fds_.push_back(InFd{fd, end});
      }
    }
    if (mh.msg_flags & MSG_CTRUNC) {
      fail("handoff socket: more descriptors arrived than a message may carry");
      return;
    }
    if (r == 0) {
      deliver();
      if (!closed_) fail("the other process closed the handoff socket");
      return;
    }
    deliver();
  }
}

void Channel::deliver() {
  if (delivering_) return;
  delivering_ = true;
  size_t pos = 0;
  while (!closed_) {
    Header h;
    std::string error;
    ParseStatus st = parse_header({in_.data() + pos, in_.size() - pos}, h, error);
    if (st == ParseStatus::malformed) {
      delivering_ = false;
      fail("handoff message: " + error);
      return;
    }
    if (st == ParseStatus::need_more || in_.size() - pos - kHeaderSize < h.body_length) break;
    Message m;
    m.header = h;
    const uint8_t* b = in_.data() + pos + kHeaderSize;
    m.body.assign(b, b + h.body_length);
    uint64_t msg_start = in_base_ + pos;
    // fds that came with bytes before this message were claimed by no one.
    while (!in_fds_.empty() && in_fds_.front().arrived_end <= msg_start) {
      ::close(in_fds_.front().fd);
      in_fds_.pop_front();
    }
    if (in_fds_.size() < h.fd_count) {
      delivering_ = false;
      fail("handoff message announces " + std::to_string(h.fd_count) + " descriptors but " +
           std::to_string(in_fds_.size()) + " arrived");
      return;
    }
    for (size_t i = 0; i < h.fd_count; ++i) {
      m.fds.push_back(in_fds_.front().fd);
      in_fds_.pop_front();
    }
    pos += kHeaderSize + h.body_length;
    ++delivered_;
    if (!close_when_sent_) on_message_(m);
    for (int fd : m.fds)
      if (fd >= 0) ::close(fd);  // whatever the handler did not take
  }
  if (pos) {
    in_.erase(in_.begin(), in_.begin() + long(pos));
    in_base_ += pos;
  }
  delivering_ = false;
}

void Channel::close_when_sent() {
  close_when_sent_ = true;  // and no more callbacks
  if (out_.empty()) close();
}

void Channel::fail_after_reading(const std::string& why) {
  // The other process went away or is going: what it sent before (an abort
  // with its reason) is still readable and says more than the write error.
  if (closed_) return;
  reading_rest_ = true;
  do_read();
  reading_rest_ = false;
  if (!closed_) fail(why);
}

void Channel::fail(const std::string& why) {
  if (closed_) return;
  OnClosed cb = std::move(on_closed_);
  close();
  if (cb && !close_when_sent_) cb(why);
}

void Channel::close() {
  if (closed_) return;
  closed_ = true;
  for (const InFd& f : in_fds_) ::close(f.fd);
  in_fds_.clear();
  out_.clear();
  uv_close(reinterpret_cast<uv_handle_t*>(&poll_), [](uv_handle_t* h) {
    auto* c = static_cast<Channel*>(h->data);
    ::close(c->fd_);
    delete c;
  });
}

}  // namespace baton::handoff
