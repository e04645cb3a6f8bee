// glibc's malloc_trim for mlxcy.memory.trim_heap (its docstring says why a
// server needs it).
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
