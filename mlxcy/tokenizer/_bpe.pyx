# cython: language_level=3, cpp_locals=False, boundscheck=False, wraparound=False, cdivision=True
"""The tokenizer's hot path: regex-equivalent pre-tokenizers, the BPE merge
loop over a (left id, right id) -> (rank, merged id) table, and a per-word cache.

Everything here works on code points read straight out of the Python string
(no intermediate copies) and on the UTF-8 bytes of each pre-token. The Python
layer (`mlxcy.tokenizer`) handles added tokens, normalizers, post-processing
and decoding; it configures one `BPECore` per tokenizer.
"""
from cpython.unicode cimport PyUnicode_READ, PyUnicode_KIND, PyUnicode_DATA
from cpython.ref cimport PyObject
from libc.stdint cimport uint8_t, uint32_t, int32_t, uint64_t, int64_t
from libcpp.vector cimport vector
from libcpp.string cimport string
from libcpp.unordered_map cimport unordered_map
from libcpp.queue cimport priority_queue
from libcpp.utility cimport pair

cdef extern from "Python.h":
    Py_ssize_t PyUnicode_GET_LENGTH(object)

# Character classes, one byte per code point (bit flags).
DEF C_L = 1      # \p{L}
DEF C_N = 2      # \p{N}
DEF C_WS = 4     # \s (White_Space)
DEF NCP = 0x110000

# Pre-tokenizer programs the scanner implements natively.
MODE_NONE = 0        # the whole piece is one word
MODE_LLAMA3 = 1      # Llama 3 / Qwen 2 regex (digit run length = max_digits)
MODE_GPT2 = 2        # GPT-2 ByteLevel regex
DEF _NONE = 0
DEF _LLAMA3 = 1
DEF _GPT2 = 2

# Words longer than this (in symbols) use the heap merge loop, and are not cached.
DEF SHORT_WORD = 48
DEF CACHE_MAX_WORD = 256
DEF CACHE_MAX_ENTRIES = 500000

ctypedef unordered_map[string, vector[int32_t]].iterator cache_it
ctypedef unordered_map[string, int32_t].iterator vocab_it
ctypedef unordered_map[uint64_t, uint64_t].iterator merge_it


cdef extern from *:
    """
    template <class It> static inline auto& deref_vec(It it) { return it->second; }
    template <class It> static inline int32_t deref_id(It it) { return it->second; }
    template <class It> static inline uint64_t deref_u64(It it) { return it->second; }
    """
    vector[int32_t]& deref_vec(cache_it) nogil
    int32_t deref_id(vocab_it) nogil
    uint64_t deref_u64(merge_it) nogil


cdef uint8_t[::1] _classes = None


def set_char_classes(table):
    """Install the code point class table (a bytes-like of length 0x110000,
    bit 1 = letter, 2 = number, 4 = White_Space). Built once by the Python
    layer, shared by every tokenizer."""
    global _classes
    cdef uint8_t[::1] t = bytearray(table)
    if t.shape[0] != NCP:
        raise ValueError(f"character class table has {t.shape[0]} entries, expected {NCP}")
    _classes = t


cdef inline uint8_t cls(uint32_t c) noexcept nogil:
    return _classes[c] if c < NCP else 0


cdef inline bint is_other(uint32_t c) noexcept nogil:
    """[^\\s\\p{L}\\p{N}]"""
    return cls(c) == 0


cdef inline bint is_crlf(uint32_t c) noexcept nogil:
    return c == 13 or c == 10


cdef inline uint32_t lower_ascii(uint32_t c) noexcept nogil:
    return c + 32 if 65 <= c <= 90 else c


cdef Py_ssize_t contraction(const uint32_t* s, Py_ssize_t i, Py_ssize_t n, bint icase) noexcept nogil:
    """Length of 's|'t|'re|'ve|'m|'ll|'d at i (0 if none)."""
    if s[i] != 39 or i + 1 >= n:
        return 0
    cdef uint32_t a = lower_ascii(s[i + 1]) if icase else s[i + 1]
    if a == 115 or a == 116 or a == 109 or a == 100:  # s t m d
        return 2
    if i + 2 >= n:
        return 0
    cdef uint32_t b = lower_ascii(s[i + 2]) if icase else s[i + 2]
    if (a == 114 and b == 101) or (a == 118 and b == 101) or (a == 108 and b == 108):  # re ve ll
        return 3
    return 0


cdef Py_ssize_t ws_tail(const uint32_t* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """`\\s+(?!\\S)|\\s+` at a whitespace code point i: the run, less its last
    character when a non-space follows and the run is longer than one."""
    cdef Py_ssize_t j = i
    while j < n and cls(s[j]) & C_WS:
        j += 1
    if j < n and j - i >= 2:
        return j - 1 - i
    return j - i


cdef Py_ssize_t match_llama3(const uint32_t* s, Py_ssize_t i, Py_ssize_t n, int max_digits) noexcept nogil:
    """Length of the match at i of
    (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,max}
    | ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"""
    cdef Py_ssize_t j, k, last
    cdef uint32_t c = s[i]
    cdef uint8_t cc = cls(c)
    k = contraction(s, i, n, True)
    if k:
        return k
    # [^\r\n\p{L}\p{N}]?\p{L}+
    j = i
    if not (cc & C_L) and not (cc & C_N) and not is_crlf(c) and i + 1 < n and cls(s[i + 1]) & C_L:
        j = i + 1
    if cls(s[j]) & C_L:
        while j < n and cls(s[j]) & C_L:
            j += 1
        return j - i
    if cc & C_N:
        j = i
        while j < n and j - i < max_digits and cls(s[j]) & C_N:
            j += 1
        return j - i
    # ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    j = i + 1 if (c == 32 and i + 1 < n and is_other(s[i + 1])) else i
    if is_other(s[j]):
        while j < n and is_other(s[j]):
            j += 1
        while j < n and is_crlf(s[j]):
            j += 1
        return j - i
    # whitespace: \s*[\r\n]+ ends after the run's last CR/LF
    j = i
    last = -1
    while j < n and cls(s[j]) & C_WS:
        if is_crlf(s[j]):
            last = j
        j += 1
    if last >= 0:
        return last + 1 - i
    return ws_tail(s, i, n)


cdef Py_ssize_t match_gpt2(const uint32_t* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Length of the match at i of GPT-2's
    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    cdef Py_ssize_t j, k
    k = contraction(s, i, n, False)
    if k:
        return k
    j = i + 1 if (s[i] == 32 and i + 1 < n) else i
    cdef uint8_t cj = cls(s[j])
    if cj & C_L:
        while j < n and cls(s[j]) & C_L:
            j += 1
        return j - i
    if cj & C_N:
        while j < n and cls(s[j]) & C_N:
            j += 1
        return j - i
    if cj == 0:
        while j < n and is_other(s[j]):
            j += 1
        return j - i
    return ws_tail(s, i, n)


cdef inline void put_utf8(string& out, uint32_t c) noexcept nogil:
    if c < 0x80:
        out.push_back(<char>c)
    elif c < 0x800:
        out.push_back(<char>(0xC0 | (c >> 6)))
        out.push_back(<char>(0x80 | (c & 0x3F)))
    elif c < 0x10000:
        out.push_back(<char>(0xE0 | (c >> 12)))
        out.push_back(<char>(0x80 | ((c >> 6) & 0x3F)))
        out.push_back(<char>(0x80 | (c & 0x3F)))
    else:
        out.push_back(<char>(0xF0 | (c >> 18)))
        out.push_back(<char>(0x80 | ((c >> 12) & 0x3F)))
        out.push_back(<char>(0x80 | ((c >> 6) & 0x3F)))
        out.push_back(<char>(0x80 | (c & 0x3F)))


cdef inline uint64_t pair_key(int32_t a, int32_t b) noexcept nogil:
    return (<uint64_t><uint32_t>a << 32) | <uint32_t>b


cdef struct Sym:
    int32_t id
    int32_t prev
    int32_t next
    int32_t nbytes   # UTF-8 bytes covered (so merged symbols can be tracked)


cdef class BPECore:
    """Pre-tokenizer + BPE model over one vocabulary.

    byte_level: words are raw UTF-8 bytes, each byte starting as its GPT-2
    byte-alphabet token. Otherwise (SentencePiece-style) each character starts
    as its own token, falling back to <0xXX> byte tokens or to unk.
    """
    cdef unordered_map[string, int32_t] vocab        # word bytes -> id
    cdef unordered_map[uint64_t, uint64_t] merges    # (a,b) -> rank<<32 | new id
    cdef unordered_map[string, vector[int32_t]] cache
    cdef int32_t byte_ids[256]       # byte-level alphabet, or <0xXX> fallback ids
    cdef bint byte_level, byte_fallback, ignore_merges, fuse_unk, has_byte_ids
    cdef int32_t unk_id
    cdef int mode, max_digits
    cdef bint digits_individual
    cdef uint32_t split_before        # split words before this code point (0: off)
    cdef vector[uint32_t] split_guard # ...unless the previous code point is one of these
    cdef vector[uint32_t] buf         # the piece being encoded, as code points

    def __init__(self, dict vocab_bytes, list merges, *, bint byte_level,
                 bint byte_fallback=False, bint ignore_merges=False, bint fuse_unk=False,
                 unk_id=None, byte_ids=None):
        """vocab_bytes: {bytes: id} with words spelled as the text spells them
        (raw bytes for byte-level). merges: [(left_id, right_id, new_id)] best
        first. byte_ids: 256 ids (byte alphabet / <0xXX> tokens, -1 missing)."""
        cdef bytes k
        for k, v in vocab_bytes.items():
            self.vocab[k] = v
        cdef uint64_t rank = 0
        cdef int32_t a, b, c
        for a, b, c in merges:
            key = pair_key(a, b)
            if self.merges.count(key) == 0:  # first (best) rank wins, as in tokenizers
                self.merges[key] = (rank << 32) | <uint32_t>c
            rank += 1
        self.byte_level = byte_level
        self.byte_fallback = byte_fallback
        self.ignore_merges = ignore_merges
        self.fuse_unk = fuse_unk
        self.unk_id = -1 if unk_id is None else unk_id
        self.has_byte_ids = byte_ids is not None
        for i in range(256):
            self.byte_ids[i] = byte_ids[i] if byte_ids is not None else -1
        self.mode = _NONE
        self.max_digits = 0
        self.digits_individual = False
        self.split_before = 0

    def set_pretokenizer(self, int mode, int max_digits=0, bint digits_individual=False,
                         str split_before=None, str split_guard=""):
        """Choose the native pre-tokenizer: MODE_NONE / MODE_LLAMA3 / MODE_GPT2,
        optionally preceded by Digits(individual_digits=True). split_before: a
        character before which a word may be cut (SentencePiece's U+2581), except
        after itself or after a character of split_guard: the characters that
        precede it inside some vocabulary token, so no merge can cross a cut."""
        if mode not in (_NONE, _LLAMA3, _GPT2):
            raise ValueError(f"unknown pre-tokenizer mode {mode}")
        self.mode = mode
        self.max_digits = max_digits if max_digits > 0 else 1 << 30
        self.digits_individual = digits_individual
        self.split_before = ord(split_before) if split_before else 0
        self.split_guard.clear()
        for ch in split_guard:
            self.split_guard.push_back(ord(ch))

    def encode(self, str text, list out):
        """Pre-tokenize `text` and append the BPE ids of every word to `out`."""
        cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text)
        if n == 0:
            return
        cdef int kind = PyUnicode_KIND(text)
        cdef void* data = PyUnicode_DATA(text)
        cdef Py_ssize_t i
        cdef uint32_t c
        self.buf.resize(n)
        for i in range(n):
            c = PyUnicode_READ(kind, data, i)
            if 0xD800 <= c < 0xE000:
                raise TypeError(f"text contains a lone surrogate U+{c:04X} at index {i}; "
                                "it has no UTF-8 form (tokenizers rejects it too)")
            self.buf[i] = c
        cdef vector[int32_t] ids
        if self.digits_individual:
            self._digits_then_scan(n, ids)
        else:
            self._scan(0, n, ids)
        for i in range(<Py_ssize_t>ids.size()):
            out.append(ids[i])

    cdef void _digits_then_scan(self, Py_ssize_t n, vector[int32_t]& ids) except *:
        """Digits(individual_digits=True): every \\p{N} is its own piece; the
        rest is scanned by the next pre-tokenizer."""
        cdef const uint32_t* s = self.buf.data()
        cdef Py_ssize_t i = 0, start = 0
        while i < n:
            if cls(s[i]) & C_N:
                if start < i:
                    self._scan(start, i, ids)
                self._word(i, i + 1, ids)
                start = i + 1
            i += 1
        if start < n:
            self._scan(start, n, ids)

    cdef void _scan(self, Py_ssize_t a, Py_ssize_t b, vector[int32_t]& ids) except *:
        """Split buf[a:b] into words with the configured regex and encode each."""
        cdef const uint32_t* s = self.buf.data() + a
        cdef Py_ssize_t n = b - a, i = 0, k
        if self.mode == _NONE:
            self._split_spaces(a, b, ids)
            return
        while i < n:
            if self.mode == _LLAMA3:
                k = match_llama3(s, i, n, self.max_digits)
            else:
                k = match_gpt2(s, i, n)
            if k <= 0:   # cannot happen (every code point matches some branch)
                k = 1
            self._word(a + i, a + i + k, ids)
            i += k

    cdef void _split_spaces(self, Py_ssize_t a, Py_ssize_t b, vector[int32_t]& ids) except *:
        """No regex: one word, cut before `split_before` where that is safe."""
        cdef const uint32_t* s = self.buf.data()
        cdef uint32_t m = self.split_before
        cdef Py_ssize_t i, start = a
        if m:
            for i in range(a + 1, b):
                if s[i] == m and s[i - 1] != m and not self._guarded(s[i - 1]):
                    self._word(start, i, ids)
                    start = i
        self._word(start, b, ids)

    cdef inline bint _guarded(self, uint32_t c) noexcept:
        cdef size_t k
        for k in range(self.split_guard.size()):
            if self.split_guard[k] == c:
                return True
        return False

    cdef void _word(self, Py_ssize_t a, Py_ssize_t b, vector[int32_t]& ids) except *:
        """BPE-encode buf[a:b] (through the cache) and append its ids."""
        cdef string w
        cdef Py_ssize_t i
        cdef cache_it it
        for i in range(a, b):
            put_utf8(w, self.buf[i])
        it = self.cache.find(w)
        if it != self.cache.end():
            ids.insert(ids.end(), deref_vec(it).begin(), deref_vec(it).end())
            return
        cdef vector[int32_t] res
        self._bpe(w, b - a, res)
        if <Py_ssize_t>w.size() <= CACHE_MAX_WORD:
            if self.cache.size() >= CACHE_MAX_ENTRIES:
                self.cache.clear()
            self.cache[w] = res
        ids.insert(ids.end(), res.begin(), res.end())

    cdef void _bpe(self, const string& w, Py_ssize_t nchars, vector[int32_t]& res) except *:
        cdef vocab_it it
        if self.ignore_merges:
            it = self.vocab.find(w)
            if it != self.vocab.end():
                res.push_back(deref_id(it))
                return
        cdef vector[Sym] syms
        self._init_symbols(w, syms)
        if syms.size() <= SHORT_WORD:
            self._merge_short(syms)
        else:
            self._merge_heap(syms)
        cdef Py_ssize_t i = 0
        while i != -1 and i < <Py_ssize_t>syms.size():
            res.push_back(syms[i].id)
            i = syms[i].next

    cdef void _init_symbols(self, const string& w, vector[Sym]& syms) except *:
        """One symbol per byte (byte-level) or per character (SentencePiece,
        with <0xXX> byte fallback, else unk, fused when fuse_unk)."""
        cdef Py_ssize_t i = 0, n = w.size(), ln, j
        cdef uint8_t b0
        cdef Sym sym
        cdef bint ok
        cdef string ch
        cdef vocab_it it
        while i < n:
            b0 = <uint8_t>w[i]
            if self.byte_level:
                self._push(syms, self.byte_ids[b0], 1, False)
                i += 1
                continue
            ln = 1 if b0 < 0x80 else (2 if b0 < 0xE0 else (3 if b0 < 0xF0 else 4))
            ch = w.substr(i, ln)
            it = self.vocab.find(ch)
            if it != self.vocab.end():
                self._push(syms, deref_id(it), ln, False)
            else:
                ok = self.byte_fallback
                if ok:
                    for j in range(ln):
                        if self.byte_ids[<uint8_t>w[i + j]] < 0:
                            ok = False
                if ok:
                    for j in range(ln):
                        self._push(syms, self.byte_ids[<uint8_t>w[i + j]], 1, False)
                else:
                    self._push(syms, self.unk_id, ln, self.fuse_unk)
            i += ln

    cdef inline void _push(self, vector[Sym]& syms, int32_t id, int32_t nb, bint fuse) except *:
        cdef Sym s
        cdef Py_ssize_t m = syms.size()
        if fuse and m > 0 and syms[m - 1].id == self.unk_id:
            syms[m - 1].nbytes += nb
            return
        if id < 0:   # no token and no unk: tokenizers drops the character too
            return
        s.id = id
        s.prev = m - 1
        s.next = m + 1
        s.nbytes = nb
        syms.push_back(s)

    cdef void _merge_short(self, vector[Sym]& syms) noexcept:
        """Repeatedly merge the best-ranked (then leftmost) adjacent pair;
        symbols are kept compact in the vector."""
        cdef Py_ssize_t n = syms.size(), i, best_i
        cdef uint64_t best, v
        cdef vector[int32_t] cur
        cdef merge_it it
        cur.resize(n)
        for i in range(n):
            cur[i] = syms[i].id
        while n > 1:
            best = <uint64_t>-1
            best_i = -1
            for i in range(n - 1):
                it = self.merges.find(pair_key(cur[i], cur[i + 1]))
                if it != self.merges.end():
                    v = deref_u64(it)
                    if v >> 32 < best >> 32:
                        best = v
                        best_i = i
            if best_i < 0:
                break
            cur[best_i] = <int32_t>(best & 0xFFFFFFFF)
            cur.erase(cur.begin() + best_i + 1)
            n -= 1
        syms.resize(n)
        for i in range(n):
            syms[i].id = cur[i]
            syms[i].next = i + 1 if i + 1 < n else -1

    cdef void _merge_heap(self, vector[Sym]& syms) noexcept:
        """Same result as _merge_short in O(n log n): a min-heap of
        (rank, position) over a linked list of symbols; stale entries are
        recognised by re-looking-up the pair."""
        cdef priority_queue[pair[int64_t, int64_t]] q   # max-heap: store negatives
        cdef Py_ssize_t n = syms.size(), i, j, p, nx
        cdef uint64_t v
        cdef merge_it it
        cdef pair[int64_t, int64_t] top
        syms[n - 1].next = -1
        for i in range(n - 1):
            it = self.merges.find(pair_key(syms[i].id, syms[i + 1].id))
            if it != self.merges.end():
                q.push(pair[int64_t, int64_t](-<int64_t>(deref_u64(it) >> 32), -i))
        while not q.empty():
            top = q.top()
            q.pop()
            p = -top.second
            if syms[p].nbytes == 0:
                continue
            nx = syms[p].next
            if nx < 0:
                continue
            it = self.merges.find(pair_key(syms[p].id, syms[nx].id))
            if it == self.merges.end() or <int64_t>(deref_u64(it) >> 32) != -top.first:
                continue
            v = deref_u64(it)
            syms[p].id = <int32_t>(v & 0xFFFFFFFF)
            syms[p].nbytes += syms[nx].nbytes
            syms[nx].nbytes = 0
            syms[p].next = syms[nx].next
            if syms[p].next >= 0:
                syms[syms[p].next].prev = p
            # new pairs with the neighbours
            j = syms[p].prev
            if j >= 0:
                it = self.merges.find(pair_key(syms[j].id, syms[p].id))
                if it != self.merges.end():
                    q.push(pair[int64_t, int64_t](-<int64_t>(deref_u64(it) >> 32), -j))
            j = syms[p].next
            if j >= 0:
                it = self.merges.find(pair_key(syms[p].id, syms[j].id))
                if it != self.merges.end():
                    q.push(pair[int64_t, int64_t](-<int64_t>(deref_u64(it) >> 32), -p))

    def bpe_word(self, bytes word):
        """BPE ids of one already pre-tokenized word (for tests and tools)."""
        cdef vector[int32_t] res
        self._bpe(word, len(word), res)
        return list(res)

    def clear_cache(self):
        self.cache.clear()


