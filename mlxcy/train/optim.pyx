# cython: language_level=3, cpp_locals=True
"""Optimizers, learning-rate schedules and gradient utilities over native
MLX arrays (the training step of mlxcy.train runs them without building a
Python object per parameter).

    opt = AdamW(learning_rate=cosine_schedule(1e-4, 1000, warmup=50), weight_decay=0.01)
    new_params = opt.update(params, grads)          # lists of Arrays (Python API)

Adam/AdamW follow PyTorch's update (bias correction on by default; set
bias_correction=False for MLX's / mlx-lm's variant); AdamW's weight decay is
decoupled (p *= 1 - lr * wd before the Adam step). SGD has momentum,
dampening, Nesterov and (coupled, L2) weight decay as in torch.optim.SGD.
Moments are kept in float32 whatever the parameters' dtype.
"""
import math

from libcpp.vector cimport vector

from mlxcy.core cimport Array, wrap, handle
from mlxcy.native cimport array as na
from mlxcy.native cimport ops as nops
from mlxcy.native cimport nn as nnn
from mlxcy.native cimport transforms as ntr
from mlxcy.native.array cimport heap

__all__ = ["Optimizer", "Adam", "AdamW", "SGD", "constant_schedule", "linear_schedule",
           "cosine_schedule", "make_schedule", "clip_grad_norm", "global_norm"]


cdef extern from *:
    """
    #include <mlx/array.h>
    static inline mlx::core::array mlxcy_train_f32(double v) {
      return mlx::core::array(static_cast<float>(v), mlx::core::float32);
    }
    static inline bool mlxcy_same_shape(const mlx::core::array& a, const mlx::core::array& b) {
      return a.shape() == b.shape();
    }
    """
    na.array _f "mlxcy_train_f32"(double) except +
    bint _same_shape "mlxcy_same_shape"(const na.array&, const na.array&)


cdef vector[na.array] _vec(list arrays, str what) except *:
    cdef vector[na.array] v = vector[na.array]()
    for a in arrays:
        if type(a) is not Array:
            raise TypeError(f"{what}: expected mlxcy Arrays, got {type(a).__name__}")
        v.push_back(handle(<Array>a)[0])
    return v


cdef list _list(const vector[na.array]& v):
    cdef size_t i
    return [wrap(new na.array(v[i])) for i in range(v.size())]


cdef int _check_pair(const vector[na.array]& params, const vector[na.array]& grads) except -1:
    cdef size_t i
    if params.size() != grads.size():
        raise ValueError(f"optimizer: {params.size()} parameters but {grads.size()} gradients")
    for i in range(params.size()):
        if not _same_shape(params[i], grads[i]):
            raise ValueError(f"optimizer: parameter {i} and its gradient differ in shape")
    return 0


cdef class Optimizer:
    """Base class: holds the step count, the schedule and the state."""

    def __cinit__(self, *args, **kwargs):
        self.m = new vector[na.array]()
        self.v = new vector[na.array]()

    def __dealloc__(self):
        if self.m != NULL:
            del self.m
            self.m = NULL
        if self.v != NULL:
            del self.v
            self.v = NULL

    def __init__(self, learning_rate=1e-3, double weight_decay=0.0):
        if not callable(learning_rate):
            learning_rate = float(learning_rate)
            if not math.isfinite(learning_rate) or learning_rate < 0:
                raise ValueError(f"learning_rate must be a finite number >= 0, got {learning_rate}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay

    def lr_at(self, step):
        """The learning rate used by update number `step` (0-based)."""
        lr = self.learning_rate
        return float(lr(step)) if callable(lr) else float(lr)

    @property
    def lr(self):
        """The learning rate of the next update."""
        return self.lr_at(self.step)

    cdef int _init_state(self, const vector[na.array]& params) except -1:
        cdef size_t i
        self.m[0].clear()
        self.v[0].clear()
        for i in range(params.size()):
            self.m[0].push_back(nops.zeros(params[i].shape(), na.float32))
            self.v[0].push_back(nops.zeros(params[i].shape(), na.float32))
        self.has_state = True
        return 0

    cdef int apply(self, vector[na.array]& params, const vector[na.array]& grads) except -1:
        _check_pair(params, grads)
        if not self.has_state or self.m[0].size() != params.size():
            self._init_state(params)
        cdef double lr = self.lr_at(self.step)
        self.step += 1
        return self._update(params, grads, lr)

    cdef int _update(self, vector[na.array]& params, const vector[na.array]& grads,
                     double lr) except -1:
        raise NotImplementedError

    cdef int state_arrays(self, vector[na.array]& out) except -1:
        cdef size_t i
        for i in range(self.m[0].size()):
            out.push_back(self.m[0][i])
            out.push_back(self.v[0][i])
        return 0

    def update(self, list params, list grads):
        """One step: returns the new parameters (a list of Arrays) and
        advances the optimizer's state."""
        cdef vector[na.array] p = _vec(params, "params")
        cdef vector[na.array] g = _vec(grads, "grads")
        self.apply(p, g)
        cdef vector[na.array] ev = vector[na.array](p)
        self.state_arrays(ev)
        with nogil:
            ntr.eval(ev)
        return _list(p)

    def state_dict(self):
        """{'step': int, 'm': [Array], 'v': [Array]} (for checkpoints)."""
        return {"step": int(self.step), "m": _list(self.m[0]) if self.has_state else [],
                "v": _list(self.v[0]) if self.has_state else []}

    def load_state_dict(self, state):
        m, v = list(state.get("m") or []), list(state.get("v") or [])
        if len(m) != len(v):
            raise ValueError("optimizer state: 'm' and 'v' differ in length")
        self.m[0] = _vec(m, "state m")
        self.v[0] = _vec(v, "state v")
        self.has_state = len(m) > 0
        self.step = int(state.get("step", 0))

    def reset(self):
        self.m[0].clear()
        self.v[0].clear()
        self.has_state = False
        self.step = 0


cdef na.array* _adam_one(const na.array& p, const na.array& g_in, na.array* m, na.array* v,
                         double lr, double b1, double b2, double eps, double wd,
                         bint bias_correction, long long t) except NULL:
    cdef na.array g = nnn.astype(g_in, na.float32)
    cdef na.array p32 = nnn.astype(p, na.float32)
    if wd > 0:
        p32 = nnn.multiply(p32, _f(1.0 - lr * wd))
    m[0] = nnn.add(nnn.multiply(m[0], _f(b1)), nnn.multiply(g, _f(1.0 - b1)))
    v[0] = nnn.add(nnn.multiply(v[0], _f(b2)), nnn.multiply(nnn.square(g), _f(1.0 - b2)))
    cdef na.array den = nnn.sqrt(v[0])
    cdef double step_size = lr
    if bias_correction:
        step_size = lr / (1.0 - b1 ** t)
        den = nnn.divide(den, _f(math.sqrt(1.0 - b2 ** t)))
    den = nnn.add(den, _f(eps))
    p32 = nops.subtract(p32, nnn.multiply(nnn.divide(m[0], den), _f(step_size)))
    return heap(nnn.astype(p32, p.dtype()))


cdef class Adam(Optimizer):
    """Adam; weight_decay here is decoupled as in AdamW (0 by default)."""
    cdef public double beta1, beta2, eps
    cdef public bint bias_correction

    def __init__(self, learning_rate=1e-3, betas=(0.9, 0.999), double eps=1e-8,
                 double weight_decay=0.0, bint bias_correction=True):
        Optimizer.__init__(self, learning_rate, weight_decay)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.beta1, self.beta2, self.eps = b1, b2, eps
        self.bias_correction = bias_correction

    cdef int _update(self, vector[na.array]& params, const vector[na.array]& grads,
                     double lr) except -1:
        cdef size_t i
        for i in range(params.size()):
            params[i] = nnn.own(_adam_one(params[i], grads[i], &self.m[0][i], &self.v[0][i], lr,
                                          self.beta1, self.beta2, self.eps, self.weight_decay,
                                          self.bias_correction, self.step))
        return 0


cdef class AdamW(Adam):
    """AdamW: decoupled weight decay (default 0.01), bias-corrected moments."""

    def __init__(self, learning_rate=1e-3, betas=(0.9, 0.999), double eps=1e-8,
                 double weight_decay=0.01, bint bias_correction=True):
        Adam.__init__(self, learning_rate, betas, eps, weight_decay, bias_correction)


cdef na.array* _sgd_one(const na.array& p, const na.array& g_in, na.array* buf, double lr,
                        double mom, double damp, double wd, bint nesterov,
                        bint first) except NULL:
    cdef na.array g = nnn.astype(g_in, na.float32)
    cdef na.array p32 = nnn.astype(p, na.float32)
    if wd > 0:
        g = nnn.add(g, nnn.multiply(p32, _f(wd)))
    if mom > 0:
        if first:
            buf[0] = g
        else:
            buf[0] = nnn.add(nnn.multiply(buf[0], _f(mom)), nnn.multiply(g, _f(1.0 - damp)))
        if nesterov:
            g = nnn.add(g, nnn.multiply(buf[0], _f(mom)))
        else:
            g = buf[0]
    p32 = nops.subtract(p32, nnn.multiply(g, _f(lr)))
    return heap(nnn.astype(p32, p.dtype()))


cdef class SGD(Optimizer):
    """SGD with optional momentum / dampening / Nesterov and L2 weight decay
    (torch.optim.SGD's rule)."""
    cdef public double momentum, dampening
    cdef public bint nesterov

    def __init__(self, learning_rate=1e-2, double momentum=0.0, double weight_decay=0.0,
                 double dampening=0.0, bint nesterov=False):
        Optimizer.__init__(self, learning_rate, weight_decay)
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0")
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov

    cdef int _update(self, vector[na.array]& params, const vector[na.array]& grads,
                     double lr) except -1:
        cdef size_t i
        for i in range(params.size()):
            params[i] = nnn.own(_sgd_one(params[i], grads[i], &self.m[0][i], lr, self.momentum,
                                         self.dampening, self.weight_decay, self.nesterov,
                                         self.step == 1))
        return 0


# ------------------------------------------------------------ utilities -----

cdef vector[na.array] clip_global_norm(const vector[na.array]& grads, double max_norm,
                                       vector[na.array]& norm_out) except *:
    cdef vector[na.array] out = vector[na.array]()
    cdef vector[int] axes
    cdef size_t i, d
    if grads.size() == 0:
        return out
    cdef na.array total = nnn.scalar(0.0, na.float32)
    for i in range(grads.size()):
        axes = vector[int]()
        for d in range(grads[i].ndim()):
            axes.push_back(d)
        total = nnn.add(total, nops.sum(nnn.square(nnn.astype(grads[i], na.float32)),
                                        axes, False))
    total = nnn.sqrt(total)
    norm_out.push_back(total)
    if max_norm <= 0:
        return grads
    # torch: coef = min(1, max_norm / (norm + 1e-6))
    cdef na.array coef = nops.minimum(nnn.divide(_f(max_norm), nnn.add(total, _f(1e-6))),
                                      _f(1.0))
    for i in range(grads.size()):
        out.push_back(nnn.astype(nnn.multiply(grads[i], coef), grads[i].dtype()))
    return out


cdef vector[na.array] add_all(const vector[na.array]& a, const vector[na.array]& b) except *:
    cdef vector[na.array] out = vector[na.array]()
    cdef size_t i
    if a.size() == 0:
        return b
    for i in range(a.size()):
        out.push_back(nnn.add(a[i], b[i]))
    return out


cdef vector[na.array] scale_all(const vector[na.array]& a, double s) except *:
    cdef vector[na.array] out = vector[na.array]()
    cdef size_t i
    for i in range(a.size()):
        out.push_back(nnn.astype(nnn.multiply(a[i], _f(s)), a[i].dtype()))
    return out


def clip_grad_norm(list grads, double max_norm):
    """(clipped grads, norm before clipping): torch.nn.utils.clip_grad_norm_'s rule."""
    cdef vector[na.array] g = _vec(grads, "grads")
    cdef vector[na.array] nrm = vector[na.array]()
    cdef vector[na.array] out = clip_global_norm(g, max_norm, nrm)
    if nrm.size() == 0:
        return [], 0.0
    return _list(out), wrap(new na.array(nrm[0]))


def global_norm(list grads):
    cdef vector[na.array] g = _vec(grads, "grads")
    cdef vector[na.array] nrm = vector[na.array]()
    clip_global_norm(g, 0.0, nrm)
    return wrap(new na.array(nrm[0])) if nrm.size() else 0.0


# ------------------------------------------------------------ schedules -----

class _Schedule:
    def __init__(self, name, fn, desc):
        self.name, self._fn, self._desc = name, fn, desc

    def __call__(self, step):
        return float(self._fn(int(step)))

    def __repr__(self):
        return f"<{self.name} schedule {self._desc}>"


def constant_schedule(lr, warmup=0, warmup_init=0.0):
    lr = float(lr)
    return _with_warmup("constant", lambda s: lr, lr, warmup, warmup_init, f"lr={lr}")


def linear_schedule(lr, steps, end=0.0, warmup=0, warmup_init=0.0):
    """Linear decay from lr to end over `steps` updates after `warmup`."""
    lr, end, steps = float(lr), float(end), int(steps)
    if steps <= 0:
        raise ValueError(f"linear schedule: steps must be > 0, got {steps}")

    def f(s):
        return lr + (end - lr) * min(s, steps) / steps
    return _with_warmup("linear", f, lr, warmup, warmup_init, f"{lr}->{end} over {steps}")


def cosine_schedule(lr, steps, end=0.0, warmup=0, warmup_init=0.0):
    """Cosine decay from lr to end over `steps` updates after `warmup`."""
    lr, end, steps = float(lr), float(end), int(steps)
    if steps <= 0:
        raise ValueError(f"cosine schedule: steps must be > 0, got {steps}")

    def f(s):
        s = min(s, steps)
        return end + (lr - end) * 0.5 * (1.0 + math.cos(math.pi * s / steps))
    return _with_warmup("cosine", f, lr, warmup, warmup_init, f"{lr}->{end} over {steps}")


def _with_warmup(name, f, lr, warmup, warmup_init, desc):
    warmup = int(warmup)
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if warmup == 0:
        return _Schedule(name, f, desc)
    w0 = float(warmup_init)

    def g(s):
        if s < warmup:
            return w0 + (lr - w0) * (s + 1) / warmup
        return f(s - warmup)
    return _Schedule(name, g, desc + f", warmup {warmup}")


def make_schedule(name, lr, steps=None, warmup=0, end=0.0, warmup_init=0.0):
    """By name: 'constant', 'linear' or 'cosine' (steps = total updates,
    warmup included)."""
    if name in (None, "constant"):
        return constant_schedule(lr, warmup, warmup_init)
    if steps is None:
        raise ValueError(f"schedule {name!r} needs the number of steps")
    decay = max(int(steps) - int(warmup), 1)
    if name == "linear":
        return linear_schedule(lr, decay, end, warmup, warmup_init)
    if name == "cosine":
        return cosine_schedule(lr, decay, end, warmup, warmup_init)
    raise ValueError(f"unknown schedule {name!r} (constant, linear, cosine)")
