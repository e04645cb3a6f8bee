// Closures that let MLX's function transformations (grad, vjp, jvp, vmap,
// checkpoint, compile) call back into Python or into native Cython code.
//
// MLX stores, copies and destroys these std::function objects wherever it
// likes -- in the compile cache, in the graph's Custom primitives, possibly on
// its own threads -- so every place that touches a PyObject takes the GIL
// itself (PyGILState_Ensure is re-entrant and cheap when already held).
//
// A Python exception raised inside a callback cannot travel through MLX's
// C++ frames as a Python error, so it is fetched into a PythonError (a C++
// exception carrying the exception object), thrown, and restored unchanged by
// raise_py_error(), the handler of every `except +raise_py_error` declaration.
#pragma once

#include <Python.h>

#include <cstdint>
#include <exception>
#include <functional>
#include <ios>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <unordered_map>
#include <utility>
#include <vector>

#include <mlx/array.h>
#include <mlx/compile.h>
#include <mlx/compile_impl.h>
#include <mlx/transforms.h>
#include <mlx/transforms_impl.h>

namespace mlxcy {
namespace mx = mlx::core;

using Arrays = std::vector<mx::array>;
using ArrayFn = std::function<Arrays(const Arrays&)>;
using ArraysPair = std::pair<Arrays, Arrays>;

inline bool python_alive() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsInitialized() && !Py_IsFinalizing();
#else
  return Py_IsInitialized() && !_Py_IsFinalizing();
#endif
}

// Holds the GIL for a scope, from any thread. Once the interpreter is shutting
// down it does nothing (live() is false): callers then leak their reference
// rather than touch a dying interpreter.
class Gil {
 public:
  Gil() : live_(python_alive()) {
    if (live_) state_ = PyGILState_Ensure();
  }
  ~Gil() {
    if (live_) PyGILState_Release(state_);
  }
  Gil(const Gil&) = delete;
  Gil& operator=(const Gil&) = delete;
  bool live() const { return live_; }

 private:
  bool live_;
  PyGILState_STATE state_{};
};

// A Python exception in flight through C++ code.
class PythonError : public std::runtime_error {
 public:
  // Takes (and clears) the current Python error. Call with the GIL held.
  static PythonError fetch() {
    PyObject *type = nullptr, *value = nullptr, *tb = nullptr;
    PyErr_Fetch(&type, &value, &tb);
    if (type == nullptr) {
      type = PyExc_SystemError;
      Py_INCREF(type);
      value = PyUnicode_FromString("mlxcy: callback failed without setting an exception");
    }
    return PythonError(std::make_shared<State>(type, value, tb), describe(value));
  }

  // Make the stored exception the current Python error again (GIL held).
  void restore() const {
    Py_XINCREF(state_->type);
    Py_XINCREF(state_->value);
    Py_XINCREF(state_->tb);
    PyErr_Restore(state_->type, state_->value, state_->tb);
  }

 private:
  struct State {
    PyObject *type, *value, *tb;
    State(PyObject* t, PyObject* v, PyObject* b) : type(t), value(v), tb(b) {}
    ~State() {
      Gil gil;
      if (!gil.live()) return;
      Py_XDECREF(type);
      Py_XDECREF(value);
      Py_XDECREF(tb);
    }
  };

  PythonError(std::shared_ptr<State> s, const std::string& what)
      : std::runtime_error(what), state_(std::move(s)) {}

  // The exception's str(), so that anything printing what() says something useful.
  static std::string describe(PyObject* value) {
    std::string out = "Python exception in a transformed function";
    if (value == nullptr) return out;
    PyObject* s = PyObject_Str(value);
    if (s != nullptr) {
      const char* c = PyUnicode_AsUTF8(s);
      if (c != nullptr) out = c;
      Py_DECREF(s);
    }
    PyErr_Clear();
    return out;
  }

  std::shared_ptr<State> state_;
};

// The `except +raise_py_error` handler: called inside a catch block, it turns
// the in-flight C++ exception into a Python one. A PythonError is restored as
// the original exception; the rest map the way Cython's default `except +`
// does, keeping MLX's message.
inline void raise_py_error() {
  try {
    throw;
  } catch (const PythonError& e) {
    e.restore();
  } catch (const std::bad_alloc& e) {
    PyErr_SetString(PyExc_MemoryError, e.what());
  } catch (const std::bad_cast& e) {
    PyErr_SetString(PyExc_TypeError, e.what());
  } catch (const std::bad_typeid& e) {
    PyErr_SetString(PyExc_TypeError, e.what());
  } catch (const std::domain_error& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::ios_base::failure& e) {
    PyErr_SetString(PyExc_IOError, e.what());
  } catch (const std::out_of_range& e) {
    PyErr_SetString(PyExc_IndexError, e.what());
  } catch (const std::overflow_error& e) {
    PyErr_SetString(PyExc_OverflowError, e.what());
  } catch (const std::range_error& e) {
    PyErr_SetString(PyExc_ArithmeticError, e.what());
  } catch (const std::underflow_error& e) {
    PyErr_SetString(PyExc_ArithmeticError, e.what());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "mlxcy: unknown C++ exception");
  }
}

// Owned reference to a Python object whose copies and destruction are safe
// from any thread.
class PyRef {
 public:
  explicit PyRef(PyObject* o) : obj_(o) { Py_XINCREF(obj_); }  // GIL held
  PyRef(const PyRef& o) : obj_(o.obj_) {
    if (obj_ == nullptr) return;
    Gil gil;
    if (gil.live()) Py_INCREF(obj_);
    else obj_ = nullptr;  // never decref what we could not incref
  }
  PyRef(PyRef&& o) noexcept : obj_(o.obj_) { o.obj_ = nullptr; }
  PyRef& operator=(const PyRef&) = delete;
  PyRef& operator=(PyRef&&) = delete;
  ~PyRef() {
    if (obj_ == nullptr) return;
    Gil gil;
    if (gil.live()) Py_DECREF(obj_);
  }
  PyObject* get() const { return obj_; }

 private:
  PyObject* obj_;
};

// Cython callback for Python functions: fills `out` from `in` and returns 0,
// or returns -1 with a Python exception set. Called with the GIL held.
using PyTrampoline = int (*)(PyObject* self, const Arrays& in, Arrays& out);

// A Python-backed ArrayFn: `self` is the Cython object the trampoline
// understands (it holds the user's callable and the argument structure).
class PyClosure {
 public:
  PyClosure(PyObject* self, PyTrampoline t) : self_(self), tramp_(t) {}
  Arrays operator()(const Arrays& in) const {
    Gil gil;
    if (!gil.live()) throw std::runtime_error("mlxcy: the Python interpreter is shutting down");
    Arrays out;
    if (tramp_(self_.get(), in, out) != 0) throw PythonError::fetch();
    return out;
  }

 private:
  PyRef self_;
  PyTrampoline tramp_;
};

// A native (Cython cdef) function: `fn(inputs, ctx)` is called with the GIL
// held and signals failure by leaving a Python exception set. `owner`, which
// may be null, is kept alive as long as any copy of the closure is: hand the
// Python object that owns `ctx` here.
using NativeFn = Arrays (*)(const Arrays& in, void* ctx);

class NativeClosure {
 public:
  NativeClosure(NativeFn fn, void* ctx, PyObject* owner) : fn_(fn), ctx_(ctx), owner_(owner) {}
  Arrays operator()(const Arrays& in) const {
    Gil gil;
    if (!gil.live()) throw std::runtime_error("mlxcy: the Python interpreter is shutting down");
    Arrays out = fn_(in, ctx_);
    if (PyErr_Occurred()) throw PythonError::fetch();
    return out;
  }

 private:
  NativeFn fn_;
  void* ctx_;
  PyRef owner_;
};

inline ArrayFn* py_closure(PyObject* self, PyTrampoline t) {
  return new ArrayFn(PyClosure(self, t));
}

inline ArrayFn* native_closure(NativeFn fn, void* ctx, PyObject* owner) {
  return new ArrayFn(NativeClosure(fn, ctx, owner));
}

inline Arrays call(const ArrayFn& f, const Arrays& in) { return f(in); }

inline ArraysPair value_and_grad(const ArrayFn& f, const Arrays& in,
                                 const std::vector<int>& argnums) {
  return mx::value_and_grad(f, argnums)(in);
}

inline ArrayFn* checkpoint(const ArrayFn& f) { return new ArrayFn(mx::checkpoint(f)); }

// A compiled function and its entries in MLX's compile cache. MLX keys the
// cache by `fun_id` (plus input shapes and a vector of constants); the owner
// picks an id unique among live compiled functions (its own address), and
// deleting this erases every cache entry under that id.
class Compiled {
 public:
  Compiled(const ArrayFn& f, std::uintptr_t fun_id, bool shapeless)
      : fun_(f), id_(fun_id), shapeless_(shapeless), cache_(mx::detail::compile_cache()) {}
  ~Compiled() {
    by_key_.clear();
    mx::detail::compile_erase(cache_, id_);
  }
  Compiled(const Compiled&) = delete;
  Compiled& operator=(const Compiled&) = delete;

  // `key` stands for everything about a call that is not an input array (the
  // argument structure, Python constants): a new key means a new trace.
  Arrays call(const Arrays& in, std::uint64_t key) {
    auto it = by_key_.find(key);
    if (it == by_key_.end()) {
      auto fn = mx::detail::compile(fun_, id_, shapeless_, std::vector<std::uint64_t>{key});
      it = by_key_.emplace(key, std::move(fn)).first;
    }
    return it->second(in);
  }

 private:
  ArrayFn fun_;
  std::uintptr_t id_;
  bool shapeless_;
  mx::detail::CompileCacheWeakPtr cache_;
  std::unordered_map<std::uint64_t, ArrayFn> by_key_;
};

}  // namespace mlxcy
