// Shims over mlx/io.h and mlx/device.h: MLX returns maps of arrays and maps of
// std::variant values, which Cython handles badly (arrays have no default
// constructor, variants have no Cython binding). These flatten them into
// parallel vectors that Cython can walk by index.
#pragma once

#include <cstddef>
#include <string>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include <mlx/device.h>
#include <mlx/io.h>

namespace mlxcy {
namespace mx = mlx::core;

struct NamedArrays {
  std::vector<std::string> names;
  std::vector<mx::array> arrays;
};

// One metadata value. kind: 0 none, 1 array (index into `arrays`), 2 string,
// 3 list of strings, 4 unsigned integer (`number`).
struct MetaItem {
  std::string key;
  int kind = 0;
  std::size_t index = 0;
  std::string str;
  std::vector<std::string> strs;
  std::size_t number = 0;
};

struct LoadResult {
  NamedArrays tensors;
  std::vector<MetaItem> meta;
  std::vector<mx::array> meta_arrays;
};

inline void add_arrays(NamedArrays& out, std::unordered_map<std::string, mx::array>& m) {
  for (auto& [name, a] : m) {
    out.names.push_back(name);
    out.arrays.push_back(std::move(a));
  }
}

inline LoadResult* load_safetensors(const std::string& path) {
  auto [arrays, meta] = mx::load_safetensors(path);
  auto* r = new LoadResult();
  add_arrays(r->tensors, arrays);
  for (auto& [k, v] : meta) {
    MetaItem item;
    item.key = k;
    item.kind = 2;
    item.str = v;
    r->meta.push_back(std::move(item));
  }
  return r;
}

inline LoadResult* load_gguf(const std::string& path) {
  auto [arrays, meta] = mx::load_gguf(path);
  auto* r = new LoadResult();
  add_arrays(r->tensors, arrays);
  for (auto& [k, v] : meta) {
    MetaItem item;
    item.key = k;
    if (auto* a = std::get_if<mx::array>(&v)) {
      item.kind = 1;
      item.index = r->meta_arrays.size();
      r->meta_arrays.push_back(*a);
    } else if (auto* s = std::get_if<std::string>(&v)) {
      item.kind = 2;
      item.str = *s;
    } else if (auto* l = std::get_if<std::vector<std::string>>(&v)) {
      item.kind = 3;
      item.strs = *l;
    }
    r->meta.push_back(std::move(item));
  }
  return r;
}

// names/arrays in parallel; metadata keys/values in parallel.
inline void save_safetensors(const std::string& path, const std::vector<std::string>& names,
                             const std::vector<mx::array>& arrays,
                             const std::vector<std::string>& keys,
                             const std::vector<std::string>& values) {
  std::unordered_map<std::string, mx::array> m;
  for (std::size_t i = 0; i < names.size(); ++i) m.insert_or_assign(names[i], arrays[i]);
  std::unordered_map<std::string, std::string> meta;
  for (std::size_t i = 0; i < keys.size(); ++i) meta[keys[i]] = values[i];
  mx::save_safetensors(path, std::move(m), std::move(meta));
}

inline mx::array* load_npy(const std::string& path) { return new mx::array(mx::load(path)); }

// mx::device_info's map of variant<string, size_t>.
inline std::vector<MetaItem> device_info(const mx::Device& d) {
  std::vector<MetaItem> out;
  for (auto& [k, v] : mx::device_info(d)) {
    MetaItem item;
    item.key = k;
    if (auto* s = std::get_if<std::string>(&v)) {
      item.kind = 2;
      item.str = *s;
    } else {
      item.kind = 4;
      item.number = std::get<std::size_t>(v);
    }
    out.push_back(std::move(item));
  }
  return out;
}

}  // namespace mlxcy
