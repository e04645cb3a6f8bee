// The C heap under MLX's CPU buffers.
//
// MLX allocates CPU buffers with malloc and frees them when its cache is
// over its limit.  Under a server's changing shapes (batches of 1-64 rows,
// caches of every length, prefix-cache nodes evicted in LRU order) glibc's
// arenas end up with hundreds of MB of free chunks between live ones, which
// glibc returns to the system only from the top of a heap: the process's RSS
// then grows in steps while the memory in use is flat.  malloc_trim(0) gives
// the whole free pages inside the arenas back (madvise), at the cost of a walk
// over the free lists (ms) and of page faults when the pages are used again.
#pragma once

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace mlxcy {

// Returns whether memory was given back; false where the C library has no
// malloc_trim (macOS, musl).
inline bool trim_heap() {
#if defined(__GLIBC__)
  return malloc_trim(0) != 0;
#else
  return false;
#endif
}

}  // namespace mlxcy
