// Small C++ helpers for mlxcy's Cython code: things Cython cannot express
// directly (optional array arguments, moving a result onto the heap, dtype
// codes, building Shapes, copying host buffers into new arrays). Nothing
// third-party lives here.
#pragma once

#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>

#include <mlx/mlx.h>

namespace mlxcy {
namespace mx = mlx::core;

// An optional array argument from Cython, where std::optional<array> cannot
// be built: a null pointer means "absent".  Every shim in include/mlxcy uses it.
inline std::optional<mx::array> opt(const mx::array* a) {
  return a ? std::optional<mx::array>(*a) : std::nullopt;
}

// Move an op's result onto the heap so a Python extension type can own it.
inline mx::array* heap(mx::array a) { return new mx::array(std::move(a)); }

// A bool scalar (Cython would route `bint` to the int constructor).
inline mx::array* new_bool(bool v) { return new mx::array(v); }

inline int dtype_code(mx::Dtype d) { return static_cast<int>(d.val()); }

inline mx::Dtype dtype_from_code(int code) {
  switch (code) {
    case 0: return mx::bool_;
    case 1: return mx::uint8;
    case 2: return mx::uint16;
    case 3: return mx::uint32;
    case 4: return mx::uint64;
    case 5: return mx::int8;
    case 6: return mx::int16;
    case 7: return mx::int32;
    case 8: return mx::int64;
    case 9: return mx::float16;
    case 10: return mx::float32;
    case 11: return mx::float64;
    case 12: return mx::bfloat16;
    case 13: return mx::complex64;
  }
  throw std::invalid_argument("[mlxcy] unknown dtype code " + std::to_string(code));
}

inline mx::Shape make_shape(const int32_t* dims, int ndim) {
  return mx::Shape(dims, dims + ndim);
}

// Small shapes, built in one call from Cython.
inline mx::Shape shape1(int a) { return mx::Shape{a}; }
inline mx::Shape shape2(int a, int b) { return mx::Shape{a, b}; }
inline mx::Shape shape3(int a, int b, int c) { return mx::Shape{a, b, c}; }
inline mx::Shape shape4(int a, int b, int c, int d) { return mx::Shape{a, b, c, d}; }

// Copy host memory into a new, evaluated array whose buffer comes from MLX's
// own allocator (aligned as its kernels expect; on CUDA, memory the device can
// read).  The caller's buffer (a numpy array, say) may be released right after.
inline mx::array* array_from_host(const void* data, const int32_t* dims, int ndim,
                                  mx::Dtype dtype) {
  size_t n = dtype.size();
  for (int i = 0; i < ndim; ++i) n *= static_cast<size_t>(dims[i]);
  auto buf = mx::allocator::malloc(n ? n : 1);
  if (n) std::memcpy(buf.buffer().raw_ptr(), data, n);
  return new mx::array(std::move(buf), make_shape(dims, ndim), dtype);
}

// Pointer to the first element of an evaluated array (offset included).
inline const void* host_data(const mx::array& a) { return a.data<char>(); }
inline bool row_contiguous(const mx::array& a) { return a.flags().row_contiguous; }

}  // namespace mlxcy
