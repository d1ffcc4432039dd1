// Reading the small files a configuration names (certificates, keys, ticket
// keys, token lists) without tripping over what a path can point at.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace baton::util {

// Reads the whole file at `path` into `out` (replacing its contents) and
// returns "", or returns what is wrong for a person to read, without the
// path: "is a directory", "is not a regular file (a FIFO)", "cannot open
// it: Permission denied", "is larger than 16 MiB", "cannot read it: ...".
// Only regular files are read (a symbolic link to one is fine); the file is
// opened non-blocking and checked on the open descriptor, so a FIFO or a
// device never blocks and nothing changes between check and read. A file
// longer than `max_bytes` is refused. Every buffer that held the file's bytes
// and was given up on the way is zeroed (keys are read with this), and so is
// `out` on failure.
[[nodiscard]] std::string read_regular_file(const std::string& path, size_t max_bytes, std::vector<unsigned char>& out);

// Overwrites `v`'s bytes with zeros in a way the compiler keeps, then clears it.
void wipe(std::vector<unsigned char>& v);
void wipe(std::string& s);

}  // namespace baton::util
