/* The lock-free hit path of reader.py, in C: the same reads in the same order, with the
 * same answers, counters and fallbacks (reader.py documents them; this file only repeats
 * what C needs). Optional: reader.py uses its pure-Python closure when this module is not
 * built, or when SHMCACHE_PURE_PYTHON=1.
 *
 * Every layout constant comes from Python (reader.py passes the Index's attributes and the
 * item header's field offsets), and so does the hash: xxh3_64 is the xxhash package's own.
 * Its extension module exports XXH3_64bits_withSeed; when reader.py names that module's
 * file, the reader calls the function directly (no Python call, no bytes object: half the
 * cost of a hit), but only after checking it against the package's xxh3_64_intdigest on
 * keys of every length class and several seeds. Otherwise it calls xxh3_64_intdigest.
 *
 * The arena is a Python mmap. A reader takes its buffer for the length of one call only, so
 * the mmap can still be closed between calls (and a closed one raises ValueError here, as
 * struct.unpack_from does in the Python reader). Shared words are read through a compiler
 * barrier: a header is copied to a local first, then decoded, so a torn header is at worst
 * a wrong one, which the bounds checks and the seqlock catch. x86-64 keeps loads in order;
 * the fences only stop the compiler from moving reads across the counter checks. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <dlfcn.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define BARRIER() __asm__ __volatile__("" ::: "memory")

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *buf;              /* the arena's mmap */
    PyObject *group_ids;        /* dict: name -> id (emptied by the store to divert) */
    PyObject *seeds;            /* tuple of ints: the hash seed of each group id */
    PyObject *resolve_group, *locked_lookup, *counts, *detour, *negative;
    PyObject *encode_key, *invalid_key, *digest;
    uint64_t (*xxh3)(const void *, size_t, uint64_t);   /* NULL: call digest */
    uint64_t *seed_words;                                  /* the seeds, for xxh3 */
    int with_expiry, stale;
    Py_ssize_t nbuckets, nstripes, stripes_off, buckets_off, refbits_off;
    Py_ssize_t low, high, pages_end, max_item, stale_off, group_record_bytes;
    Py_ssize_t item_header_bytes, max_key_bytes, refbit_granule, per_group;
    int read_attempts, max_chain, state_live, state_negative;
    int hits, misses, hot_hits, negative_kind;
    int o_chain, o_state, o_klen, o_gid, o_frac, o_seconds, o_vlen;
} Reader;

static PyObject *ONE;

static int
count(Reader *self, Py_ssize_t gid, int kind)
{
    /* counts[gid * PER_GROUP + kind] += 1 (metrics.py's list) */
    Py_ssize_t i = gid * self->per_group + kind;
    PyObject *counts = self->counts;
    if (!PyList_CheckExact(counts)) {
        PyObject *index = PyLong_FromSsize_t(i), *old, *new;
        if (index == NULL)
            return -1;
        old = PyObject_GetItem(counts, index);
        new = old == NULL ? NULL : PyNumber_Add(old, ONE);
        Py_XDECREF(old);
        int failed = new == NULL || PyObject_SetItem(counts, index, new) < 0;
        Py_XDECREF(new);
        Py_DECREF(index);
        return failed ? -1 : 0;
    }
    if (i < 0 || i >= PyList_GET_SIZE(counts)) {
        PyErr_SetString(PyExc_IndexError, "list index out of range");
        return -1;
    }
    PyObject *old = PyList_GET_ITEM(counts, i);
    if (!PyLong_CheckExact(old)) {
        Py_INCREF(old);
        PyObject *new = PyNumber_Add(old, ONE);
        Py_DECREF(old);
        if (new == NULL)
            return -1;
        int failed = PyList_SetItem(counts, i, new) < 0;   /* steals new */
        return failed ? -1 : 0;
    }
    PyObject *new = PyNumber_Add(old, ONE);         /* int + int: runs no Python code */
    if (new == NULL)
        return -1;
    PyList_SET_ITEM(counts, i, new);
    Py_DECREF(old);
    return 0;
}

static double
now(void)
{
    /* time.time(): CLOCK_REALTIME in nanoseconds, converted as CPython converts it */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    if (ns % 1000000000 == 0)
        return (double)(ns / 1000000000);
    return (double)ns / 1e9;
}

static inline uint32_t
get_u32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static PyObject *
locked(Reader *self, PyObject *gid_obj, Py_ssize_t gid, PyObject *key_bytes)
{
    PyObject *args[4] = {gid_obj, key_bytes, self->with_expiry ? Py_True : Py_False,
                         self->negative};
    PyObject *found = PyObject_Vectorcall(self->locked_lookup, args, 4, NULL);
    if (found == NULL)
        return NULL;
    int kind = found == Py_None ? self->misses
               : found == self->negative ? self->negative_kind : self->hits;
    if (count(self, gid, kind) < 0) {
        Py_DECREF(found);
        return NULL;
    }
    return found;
}

static PyObject *
reader_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Reader *self = (Reader *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (self->buf == NULL) {                        /* cleared by the garbage collector */
        PyErr_SetString(PyExc_ValueError, "this reader was cleared");
        return NULL;
    }
    if (nargs != 2 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_Format(PyExc_TypeError, "get() takes 2 positional arguments (group, key)");
        return NULL;
    }
    PyObject *group = args[0], *key = args[1];
    PyObject *gid_obj = PyDict_GetItemWithError(self->group_ids, group);
    if (gid_obj == NULL) {
        if (PyErr_Occurred())
            return NULL;
        gid_obj = PyObject_CallOneArg(self->resolve_group, group);
        if (gid_obj == NULL)
            return NULL;
        if (gid_obj == Py_None) {
            Py_DECREF(gid_obj);
            return PyObject_Vectorcall(self->detour, args, 2, NULL);
        }
    }
    else
        Py_INCREF(gid_obj);

    PyObject *result = NULL, *key_bytes = NULL, *value = NULL, *hashed = NULL;
    Py_buffer view = {0};
    Py_ssize_t gid = PyLong_AsSsize_t(gid_obj);
    if (gid == -1 && PyErr_Occurred())
        goto done;
    Py_ssize_t klen;
    const char *kptr;
    if (PyUnicode_CheckExact(key)) {            /* its UTF-8, cached in the str object */
        kptr = PyUnicode_AsUTF8AndSize(key, &klen);
        if (kptr == NULL)
            goto done;
    }
    else {
        key_bytes = PyObject_CallOneArg(self->encode_key, key);
        if (key_bytes == NULL)
            goto done;
        if (!PyBytes_Check(key_bytes)) {
            PyErr_SetString(PyExc_TypeError, "encode_key must return bytes");
            goto done;
        }
        klen = PyBytes_GET_SIZE(key_bytes);
        kptr = PyBytes_AS_STRING(key_bytes);
    }
    if (!(0 < klen && klen <= self->max_key_bytes)) {
        PyErr_Format(self->invalid_key, "key must be 1 to %zd bytes, got %zd",
                     self->max_key_bytes, klen);
        goto done;
    }
    if (gid < 0 || gid >= PyTuple_GET_SIZE(self->seeds)) {
        PyErr_SetString(PyExc_IndexError, "list index out of range");
        goto done;
    }
    unsigned long long digest;
    if (self->xxh3 != NULL)
        digest = self->xxh3(kptr, (size_t)klen, self->seed_words[gid]);
    else {
        if (key_bytes == NULL && (key_bytes = PyBytes_FromStringAndSize(kptr, klen)) == NULL)
            goto done;
        kptr = PyBytes_AS_STRING(key_bytes);
        PyObject *hash_args[2] = {key_bytes, PyTuple_GET_ITEM(self->seeds, gid)};
        hashed = PyObject_Vectorcall(self->digest, hash_args, 2, NULL);
        if (hashed == NULL)
            goto done;
        digest = PyLong_AsUnsignedLongLong(hashed);
        if (digest == (unsigned long long)-1 && PyErr_Occurred())
            goto done;
    }
    Py_ssize_t bucket = (Py_ssize_t)(digest % (unsigned long long)self->nbuckets);
    Py_ssize_t seq_off = self->stripes_off + (bucket % self->nstripes) * 4;
    Py_ssize_t bucket_off = self->buckets_off + bucket * 4;

    if (PyObject_GetBuffer(self->buf, &view, PyBUF_WRITABLE) < 0)
        goto done;
    uint8_t *base = view.buf;
    Py_ssize_t size = view.len;
    if (size < self->pages_end || seq_off + 4 > size || bucket_off + 4 > size) {
        PyErr_SetString(PyExc_ValueError, "the arena is smaller than its layout");
        goto done;
    }
    const uint32_t *seq_word = (const uint32_t *)(base + seq_off);
    const Py_ssize_t ihb = self->item_header_bytes;
    uint8_t head[32];
    uint32_t state = 0, frac = 0, seconds = 0;
    Py_ssize_t found = 0, hops = 0;
    int attempts = self->read_attempts;
    while (attempts) {
        attempts--;
        uint32_t seq = __atomic_load_n(seq_word, __ATOMIC_ACQUIRE);
        if (seq & 1) {
            /* Let the mmap go while other threads run: a close meanwhile must succeed
             * (then the next read raises ValueError, as in the Python reader). */
            PyBuffer_Release(&view);
            Py_BEGIN_ALLOW_THREADS
            sched_yield();
            Py_END_ALLOW_THREADS
            if (PyObject_GetBuffer(self->buf, &view, PyBUF_WRITABLE) < 0)
                goto done;
            if (view.buf != base || view.len != size) {
                PyErr_SetString(PyExc_ValueError, "the arena's mapping changed");
                goto done;
            }
            continue;
        }
        uint32_t ref = __atomic_load_n((const uint32_t *)(base + bucket_off), __ATOMIC_RELAXED);
        found = hops = 0;
        while (ref) {
            Py_ssize_t offset = (Py_ssize_t)ref << 3;
            if (offset < self->low || offset > self->high || hops == self->max_chain)
                break;                              /* torn, or long: the checks below decide */
            memcpy(head, base + offset, (size_t)ihb);
            BARRIER();                              /* decode the copy, never shared memory */
            ref = get_u32(head + self->o_chain);
            state = head[self->o_state];
            uint32_t item_klen = head[self->o_klen], item_gid = head[self->o_gid];
            frac = head[self->o_frac];
            seconds = get_u32(head + self->o_seconds);
            uint32_t vlen = get_u32(head + self->o_vlen);
            if (item_klen == (uint32_t)klen && item_gid == (uint32_t)gid && (state & 1)) {
                Py_ssize_t start = offset + ihb;
                if (start + klen <= size && memcmp(base + start, kptr, (size_t)klen) == 0) {
                    start += klen;
                    if ((Py_ssize_t)vlen <= self->max_item && start + (Py_ssize_t)vlen <= self->pages_end) {
                        value = PyBytes_FromStringAndSize((const char *)base + start, vlen);
                        if (value == NULL)
                            goto done;
                        found = offset;
                    }
                    break;
                }
            }
            hops++;
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(seq_word, __ATOMIC_RELAXED) != seq) {
            Py_CLEAR(value);
            continue;
        }
        if (!found) {
            if (hops == self->max_chain)
                break;
            PyBuffer_Release(&view);
            if (count(self, gid, self->misses) == 0) {
                result = Py_None;
                Py_INCREF(result);
            }
            goto done;
        }
        double expiry = (double)seconds + (double)frac * (1.0 / 256);
        if (seconds && expiry <= now()) {
            double window = 0;
            if (self->stale) {
                Py_ssize_t at = self->stale_off + gid * self->group_record_bytes;
                if (at + 8 > size) {
                    PyErr_SetString(PyExc_ValueError, "the arena is smaller than its layout");
                    goto done;
                }
                memcpy(&window, base + at, 8);
            }
            if (!self->stale || expiry + window <= now()) {
                PyBuffer_Release(&view);
                Py_CLEAR(value);
                if (count(self, gid, self->misses) == 0) {
                    result = Py_None;
                    Py_INCREF(result);
                }
                goto done;
            }
        }
        Py_ssize_t bit = (found - self->low) / self->refbit_granule;
        Py_ssize_t byte_off = self->refbits_off + (bit >> 3);
        uint8_t mask = (uint8_t)(1 << (bit & 7));
        volatile uint8_t *refbyte = base + byte_off;
        if (byte_off < size && !(*refbyte & mask))  /* write only when it changes: hot */
            *refbyte |= mask;                       /* items stay read-only cache lines */
        PyBuffer_Release(&view);
        if (state != (uint32_t)self->state_live) {
            if (state == (uint32_t)self->state_negative) {
                Py_CLEAR(value);
                if (count(self, gid, self->negative_kind) == 0) {
                    result = self->negative;
                    Py_INCREF(result);
                }
                goto done;
            }
            if (count(self, gid, self->hot_hits) < 0)
                goto done;
        }
        if (count(self, gid, self->hits) < 0)
            goto done;
        if (self->with_expiry) {
            PyObject *when = seconds ? PyFloat_FromDouble(expiry) : Py_NewRef(Py_None);
            if (when == NULL)
                goto done;
            result = PyTuple_Pack(3, value, when,
                                  state != (uint32_t)self->state_live ? Py_True : Py_False);
            Py_DECREF(when);
        }
        else {
            result = value;
            value = NULL;
        }
        goto done;
    }
    PyBuffer_Release(&view);
    if (key_bytes == NULL && (key_bytes = PyBytes_FromStringAndSize(kptr, klen)) == NULL)
        goto done;
    result = locked(self, gid_obj, gid, key_bytes);
done:
    if (view.obj != NULL)
        PyBuffer_Release(&view);
    Py_XDECREF(value);
    Py_XDECREF(hashed);
    Py_XDECREF(key_bytes);
    Py_DECREF(gid_obj);
    return result;
}

static int
get_size(PyObject *layout, const char *name, Py_ssize_t *out)
{
    PyObject *item = PyDict_GetItemString(layout, name);
    if (item == NULL) {
        PyErr_Format(PyExc_KeyError, "layout lacks %s", name);
        return -1;
    }
    *out = PyLong_AsSsize_t(item);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

static int
get_int(PyObject *layout, const char *name, int *out, int low, int high)
{
    Py_ssize_t value;
    if (get_size(layout, name, &value) < 0)
        return -1;
    if (value < low || value > high) {
        PyErr_Format(PyExc_ValueError, "layout %s out of range: %zd", name, value);
        return -1;
    }
    *out = (int)value;
    return 0;
}

static int
use_library(Reader *self, PyObject *library)
{
    /* Take XXH3_64bits_withSeed from the (already loaded) library file ``library`` if it
     * is there and agrees with self->digest; else leave self->xxh3 NULL. -1 on an error. */
    PyObject *path = NULL;
    if (!PyUnicode_FSConverter(library, &path))
        return -1;
    void *handle = dlopen(PyBytes_AS_STRING(path), RTLD_NOW | RTLD_NOLOAD);
    Py_DECREF(path);
    if (handle == NULL)
        return 0;
    uint64_t (*xxh3)(const void *, size_t, uint64_t) =
        (uint64_t (*)(const void *, size_t, uint64_t))dlsym(handle, "XXH3_64bits_withSeed");
    dlclose(handle);          /* the module keeps it loaded (we asked for it with NOLOAD) */
    if (xxh3 == NULL)
        return 0;
    Py_ssize_t nseeds = PyTuple_GET_SIZE(self->seeds);
    self->seed_words = PyMem_Calloc(nseeds ? nseeds : 1, sizeof(uint64_t));
    if (self->seed_words == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < nseeds; i++) {
        self->seed_words[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(self->seeds, i));
        if (self->seed_words[i] == (uint64_t)-1 && PyErr_Occurred())
            return -1;
    }
    /* every length class of XXH3 (1-3, 4-8, 9-16, 17-128, 129-240, longer), several seeds */
    static const size_t lengths[] = {1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 31, 64, 127, 128, 129,
                                     200, 240, 241, 250, 300};
    char data[300];
    for (size_t i = 0; i < sizeof(data); i++)
        data[i] = (char)(i * 131 + 7);
    for (size_t l = 0; l < sizeof(lengths) / sizeof(lengths[0]); l++) {
        for (Py_ssize_t s = 0; s < (nseeds < 3 ? nseeds : 3); s++) {
            PyObject *bytes = PyBytes_FromStringAndSize(data, (Py_ssize_t)lengths[l]);
            if (bytes == NULL)
                return -1;
            PyObject *hash_args[2] = {bytes, PyTuple_GET_ITEM(self->seeds, s)};
            PyObject *hashed = PyObject_Vectorcall(self->digest, hash_args, 2, NULL);
            Py_DECREF(bytes);
            if (hashed == NULL)
                return -1;
            unsigned long long want = PyLong_AsUnsignedLongLong(hashed);
            Py_DECREF(hashed);
            if (want == (unsigned long long)-1 && PyErr_Occurred())
                return -1;
            if (xxh3(data, lengths[l], self->seed_words[s]) != want)
                return 0;                               /* not the same function: call it */
        }
    }
    self->xxh3 = xxh3;
    return 0;
}

static PyObject *
reader_xxh3_direct(Reader *self, void *closure)
{
    return PyBool_FromLong(self->xxh3 != NULL);
}

static PyGetSetDef reader_getset[] = {
    {"xxh3_direct", (getter)reader_xxh3_direct, NULL,
     "True if it hashes with the xxhash library's function directly", NULL},
    {NULL},
};

static PyObject *
reader_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"buf", "group_ids", "seeds", "resolve_group", "locked_lookup",
                            "counts", "detour", "negative", "encode_key", "invalid_key",
                            "digest", "layout", "with_expiry", "stale", "xxh3_library", NULL};
    PyObject *buf, *group_ids, *seeds, *resolve_group, *locked_lookup, *counts, *detour;
    PyObject *negative, *encode_key, *invalid_key, *digest, *layout;
    int with_expiry = 0, stale = 0;
    PyObject *library = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!OOOOOOOOOO!|ppO", names, &buf,
                                     &PyDict_Type, &group_ids, &seeds, &resolve_group,
                                     &locked_lookup, &counts, &detour, &negative, &encode_key,
                                     &invalid_key, &digest, &PyDict_Type, &layout,
                                     &with_expiry, &stale, &library))
        return NULL;
    if (!PyObject_CheckBuffer(buf)) {
        PyErr_SetString(PyExc_TypeError, "buf must support the buffer protocol");
        return NULL;
    }
    PyObject *seed_tuple = PySequence_Tuple(seeds);
    if (seed_tuple == NULL)
        return NULL;
    Reader *self = PyObject_GC_New(Reader, type);
    if (self == NULL) {
        Py_DECREF(seed_tuple);
        return NULL;
    }
    self->vectorcall = reader_vectorcall;
    self->xxh3 = NULL;
    self->seed_words = NULL;
    self->buf = Py_NewRef(buf);
    self->group_ids = Py_NewRef(group_ids);
    self->seeds = seed_tuple;
    self->resolve_group = Py_NewRef(resolve_group);
    self->locked_lookup = Py_NewRef(locked_lookup);
    self->counts = Py_NewRef(counts);
    self->detour = Py_NewRef(detour);
    self->negative = Py_NewRef(negative);
    self->encode_key = Py_NewRef(encode_key);
    self->invalid_key = Py_NewRef(invalid_key);
    self->digest = Py_NewRef(digest);
    self->with_expiry = with_expiry;
    self->stale = stale;
    PyObject_GC_Track(self);
    if (get_size(layout, "nbuckets", &self->nbuckets) < 0
        || get_size(layout, "nstripes", &self->nstripes) < 0
        || get_size(layout, "stripes_off", &self->stripes_off) < 0
        || get_size(layout, "buckets_off", &self->buckets_off) < 0
        || get_size(layout, "refbits_off", &self->refbits_off) < 0
        || get_size(layout, "low", &self->low) < 0
        || get_size(layout, "high", &self->high) < 0
        || get_size(layout, "pages_end", &self->pages_end) < 0
        || get_size(layout, "max_item", &self->max_item) < 0
        || get_size(layout, "stale_off", &self->stale_off) < 0
        || get_size(layout, "group_record_bytes", &self->group_record_bytes) < 0
        || get_size(layout, "item_header_bytes", &self->item_header_bytes) < 0
        || get_size(layout, "max_key_bytes", &self->max_key_bytes) < 0
        || get_size(layout, "refbit_granule", &self->refbit_granule) < 0
        || get_size(layout, "per_group", &self->per_group) < 0
        || get_int(layout, "read_attempts", &self->read_attempts, 0, 1 << 20) < 0
        || get_int(layout, "max_chain", &self->max_chain, 0, 1 << 20) < 0
        || get_int(layout, "state_live", &self->state_live, 0, 255) < 0
        || get_int(layout, "state_negative", &self->state_negative, 0, 255) < 0
        || get_int(layout, "hits", &self->hits, 0, 1 << 16) < 0
        || get_int(layout, "misses", &self->misses, 0, 1 << 16) < 0
        || get_int(layout, "hot_hits", &self->hot_hits, 0, 1 << 16) < 0
        || get_int(layout, "negative_kind", &self->negative_kind, 0, 1 << 16) < 0
        || get_int(layout, "o_chain", &self->o_chain, 0, 28) < 0
        || get_int(layout, "o_state", &self->o_state, 0, 31) < 0
        || get_int(layout, "o_klen", &self->o_klen, 0, 31) < 0
        || get_int(layout, "o_gid", &self->o_gid, 0, 31) < 0
        || get_int(layout, "o_frac", &self->o_frac, 0, 31) < 0
        || get_int(layout, "o_seconds", &self->o_seconds, 0, 28) < 0
        || get_int(layout, "o_vlen", &self->o_vlen, 0, 28) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    if (self->nbuckets <= 0 || self->nstripes <= 0 || self->refbit_granule <= 0
        || self->item_header_bytes < 16 || self->item_header_bytes > 32
        || self->o_chain + 4 > self->item_header_bytes
        || self->o_seconds + 4 > self->item_header_bytes
        || self->o_vlen + 4 > self->item_header_bytes
        || self->low < 0 || self->high + self->item_header_bytes > self->pages_end) {
        PyErr_SetString(PyExc_ValueError, "inconsistent layout");
        Py_DECREF(self);
        return NULL;
    }
    if (library != Py_None && use_library(self, library) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
reader_traverse(Reader *self, visitproc visit, void *arg)
{
    Py_VISIT(self->buf);
    Py_VISIT(self->group_ids);
    Py_VISIT(self->seeds);
    Py_VISIT(self->resolve_group);
    Py_VISIT(self->locked_lookup);
    Py_VISIT(self->counts);
    Py_VISIT(self->detour);
    Py_VISIT(self->negative);
    Py_VISIT(self->encode_key);
    Py_VISIT(self->invalid_key);
    Py_VISIT(self->digest);
    return 0;
}

static int
reader_clear(Reader *self)
{
    Py_CLEAR(self->buf);
    Py_CLEAR(self->group_ids);
    Py_CLEAR(self->seeds);
    Py_CLEAR(self->resolve_group);
    Py_CLEAR(self->locked_lookup);
    Py_CLEAR(self->counts);
    Py_CLEAR(self->detour);
    Py_CLEAR(self->negative);
    Py_CLEAR(self->encode_key);
    Py_CLEAR(self->invalid_key);
    Py_CLEAR(self->digest);
    return 0;
}

static void
reader_dealloc(Reader *self)
{
    PyObject_GC_UnTrack(self);
    reader_clear(self);
    PyMem_Free(self->seed_words);
    PyObject_GC_Del(self);
}

static PyObject *
reader_call(PyObject *self, PyObject *args, PyObject *kwargs)
{
    return PyVectorcall_Call(self, args, kwargs);
}

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmcache._native.Reader",
    .tp_doc = "get(group, key): reader.py's lock-free read, in C",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Reader, vectorcall),
    .tp_call = reader_call,
    .tp_new = reader_new,
    .tp_traverse = (traverseproc)reader_traverse,
    .tp_clear = (inquiry)reader_clear,
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_getset = reader_getset,
};


/* -- the write step of an in-place rewrite (lru_index.Index._rewrite), in C ----------------
 *
 * Only for the holder of the write lock, inside a journal step (store.py's ``locked``), with
 * the item's stripe already odd. The same stores as the Python method, in the same order,
 * each journaled one recorded before it is made; a compiler barrier between stores keeps
 * that order (x86-64 keeps it in hardware), so a writer killed anywhere leaves what a killed
 * Python writer would leave: the journal undoes the open step, and an item left in
 * STATE_WRITING is absent to readers. Every constant comes from Python (lru_index.py). */

typedef struct {
    PyObject_HEAD
    PyObject *buf;               /* the arena's mmap */
    PyObject *journal_full;      /* journal.JournalFull */
    PyObject *pause;             /* tests: called with "w64" / "checkpoint" before each */
    Py_ssize_t log_start, log_end, entry_bytes, e_word, e_old, e_step, tx_active, tx_seq;
    Py_ssize_t item_header_bytes, o_word0, o_klen, o_gid, o_expiry, groups_off, group_record_bytes;
    Py_ssize_t g_sets, refbits_off, pages_off, refbit_granule;
    uint64_t keep_mask, state_writing;
    /* the new-key insertion (writer_insert): slab, ring, bucket and count fields */
    Py_ssize_t classes_off, class_record_bytes, c_partial, max_classes;
    Py_ssize_t c_chunk_size, c_vote_size, c_vote_lead, h_class_count, h_free_pages;
    Py_ssize_t chunk_align, fit_shift, votes_for_new_class, g_budget;
    Py_ssize_t pagemeta_off, page_record_bytes, page_size, npages;
    Py_ssize_t p_class, p_carve, p_used, p_free_head, p_chunk_size, p_slots;
    Py_ssize_t p_class_carve, p_used_free;
    Py_ssize_t o_chain, o_state, o_vlen, o_prev, o_next;
    Py_ssize_t g_hand, g_bytes, g_items, max_groups;
} Writer;

static inline void
put_u32(uint8_t *p, uint32_t v)
{
    memcpy(p, &v, 4);
}

static inline uint64_t
get_u64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline void
put_u64(uint8_t *p, uint64_t v)
{
    memcpy(p, &v, 8);
}

static int
pause_before(Writer *self, const char *what)
{
    /* The crash tests freeze a writer before its N-th journaled write or checkpoint, as
     * they patch journal.Journal's methods for the Python rewrite; None: no call. */
    if (self->pause == NULL || self->pause == Py_None)
        return 0;
    PyObject *result = PyObject_CallFunction(self->pause, "s", what);
    Py_XDECREF(result);
    return result == NULL ? -1 : 0;
}

static int
journal_call(Writer *self, uint8_t *buf, Py_ssize_t size, Py_ssize_t *pos, const char *what,
             Py_ssize_t off, int width, uint64_t first, uint64_t second, uint64_t step)
{
    /* One journal.w32 (width 4), w64 (8) or w64x2 (16) call: the pause hook, the full check
     * journal.py makes, the entries (step id last), then the store(s). */
    if (pause_before(self, what) < 0)
        return -1;
    Py_ssize_t p = *pos, word = off & ~(Py_ssize_t)7;
    if (p + (width == 16 ? self->entry_bytes : 0) >= self->log_end) {
        PyErr_Format(self->journal_full, "journal step exceeded its log");
        return -1;
    }
    if (off < 0 || word + (width == 16 ? 16 : 8) > size || (width > 4 && off & 7)) {
        PyErr_Format(PyExc_ValueError, "insert: journaled word %zd out of bounds", off);
        return -1;
    }
    if (width == 16) {
        uint64_t old_first = get_u64(buf + off), old_second = get_u64(buf + off + 8);
        put_u64(buf + p + self->e_word, (uint64_t)off);
        put_u64(buf + p + self->e_old, old_first);
        BARRIER();
        put_u64(buf + p + self->e_step, step);
        BARRIER();
        p += self->entry_bytes;
        put_u64(buf + p + self->e_word, (uint64_t)off + 8);
        put_u64(buf + p + self->e_old, old_second);
        BARRIER();
        put_u64(buf + p + self->e_step, step);
        BARRIER();
        put_u64(buf + off, first);
        put_u64(buf + off + 8, second);
    }
    else {
        put_u64(buf + p + self->e_word, (uint64_t)word);
        put_u64(buf + p + self->e_old, get_u64(buf + word));
        BARRIER();
        put_u64(buf + p + self->e_step, step);
        BARRIER();
        if (width == 8)
            put_u64(buf + off, first);
        else
            put_u32(buf + off, (uint32_t)first);
    }
    BARRIER();
    *pos = p + self->entry_bytes;
    return 0;
}

static PyObject *
writer_rewrite(Writer *self, PyObject *const *args, Py_ssize_t nargs)
{
    /* rewrite(offset, value, seconds, state_and_frac, pos, step) -> the step now open.
     * Python then sets the journal's pos to its start + one entry, and its step to this. */
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "rewrite() takes 6 arguments");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[0]);
    unsigned long long seconds = PyLong_AsUnsignedLongLong(args[2]);
    unsigned long long state_frac = PyLong_AsUnsignedLongLong(args[3]);
    Py_ssize_t pos = PyLong_AsSsize_t(args[4]);
    unsigned long long step = PyLong_AsUnsignedLongLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer value, arena;
    if (PyObject_GetBuffer(args[1], &value, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(self->buf, &arena, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&value);
        return NULL;
    }
    PyObject *result = NULL;
    uint8_t *buf = arena.buf;
    Py_ssize_t size = arena.len;
    if (offset < self->pages_off || (offset + self->o_word0) & 7
            || offset + self->item_header_bytes > size) {
        PyErr_Format(PyExc_ValueError, "rewrite: item offset %zd out of bounds", offset);
        goto done;
    }
    Py_ssize_t start = offset + self->item_header_bytes + buf[offset + self->o_klen];
    Py_ssize_t gid = buf[offset + self->o_gid];
    Py_ssize_t sets = self->groups_off + gid * self->group_record_bytes + self->g_sets;
    if (start + value.len > size || sets + 8 > size || self->tx_seq + 8 > size) {
        PyErr_Format(PyExc_ValueError, "rewrite: value of item %zd out of bounds", offset);
        goto done;
    }
    Py_ssize_t word0 = offset + self->o_word0;
    uint64_t word = get_u64(buf + word0) & self->keep_mask;
    if (journal_call(self, buf, size, &pos, "w64", word0, 8, word | self->state_writing << 32,
                     0, step) < 0)
        goto done;
    if (pause_before(self, "checkpoint") < 0)
        goto done;
    /* journal.checkpoint(): the active id moves to a new one in one store, then the seq */
    step = get_u64(buf + self->tx_seq) + 1;
    put_u64(buf + self->tx_active, step);
    BARRIER();
    put_u64(buf + self->tx_seq, step);
    BARRIER();
    /* the value and the expiry seconds: not journaled (the item is WRITING, readers skip it) */
    memcpy(buf + start, value.buf, value.len);
    uint32_t secs = (uint32_t)seconds;
    memcpy(buf + offset + self->o_expiry, &secs, 4);
    BARRIER();
    /* readable again, in the first entry of the new step */
    pos = self->log_start;
    if (journal_call(self, buf, size, &pos, "w64", word0, 8, word | (uint64_t)state_frac << 32,
                     0, step) < 0)
        goto done;
    /* an update is a reference: the CLOCK bit; and the group's set counter */
    Py_ssize_t bit = (offset - self->pages_off) / self->refbit_granule;
    Py_ssize_t byte = self->refbits_off + (bit >> 3);
    if (byte < size)
        buf[byte] |= (uint8_t)(1 << (bit & 7));
    put_u64(buf + sets, get_u64(buf + sets) + 1);
    result = PyLong_FromUnsignedLongLong(step);
done:
    PyBuffer_Release(&arena);
    PyBuffer_Release(&value);
    return result;
}

/* -- the new-key insertion of Index.store (lru_index.py), in C -------------------------------
 *
 * The common case only: a chunk of the class from the first page on its partial list (from
 * the page's free list, else carved), then the item, the ring, the bucket and the counts,
 * exactly as Slabs.alloc and Index.store make them. Anything else (no partial page, a full
 * one at the head, a record out of bounds) is declined before the first store: Python then
 * does the whole insertion as it always did.
 *
 * Before the chunk, what Index.store and Slabs.class_for do first: the budget check (over
 * budget: declined, Python evicts) and the class choice, the smallest chunk size that holds
 * the item, the lowest class id among equal sizes (class_for's sorted list and bisect). A
 * bad fit casts Slabs._vote's vote (an unjournaled hint), unless that vote would make a new
 * class: then declined. Every decision is taken before the first write, so a declined call
 * has written nothing, not even the vote. */

static PyObject *
writer_insert(Writer *self, PyObject *const *args, Py_ssize_t nargs)
{
    /* insert(gid, bucket_off, key, value, seconds, state_and_frac, pos, step)
     * -> the journal's new pos (the step stays open, the same one), or None: declined,
     * nothing written. */
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "insert() takes 8 arguments");
        return NULL;
    }
    Py_ssize_t gid = PyLong_AsSsize_t(args[0]);
    Py_ssize_t bucket_off = PyLong_AsSsize_t(args[1]);
    unsigned long long seconds = PyLong_AsUnsignedLongLong(args[4]);
    unsigned long long state_frac = PyLong_AsUnsignedLongLong(args[5]);
    Py_ssize_t pos = PyLong_AsSsize_t(args[6]);
    unsigned long long step = PyLong_AsUnsignedLongLong(args[7]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer key, value, arena;
    if (PyObject_GetBuffer(args[2], &key, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[3], &value, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&key);
        return NULL;
    }
    if (PyObject_GetBuffer(self->buf, &arena, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&value);
        PyBuffer_Release(&key);
        return NULL;
    }
    PyObject *result = NULL;
    uint8_t *buf = arena.buf;
    Py_ssize_t size = arena.len, klen = key.len, vlen = value.len, nbytes = klen + vlen;
    Py_ssize_t group = self->groups_off + gid * self->group_record_bytes;
    if (gid < 0 || gid >= self->max_groups || klen > 255 || vlen > 0xFFFFFFFFLL
            || seconds > 0xFFFFFFFFULL || state_frac > 0xFFFFFFFFULL
            || bucket_off < 0 || bucket_off + 4 > size
            || group + self->group_record_bytes > size || pos < self->log_start
            || self->classes_off + self->max_classes * self->class_record_bytes > size
            || self->pagemeta_off + self->npages * self->page_record_bytes > size
            || self->h_class_count + 4 > size || self->h_free_pages + 4 > size) {
        PyErr_SetString(PyExc_ValueError, "insert: argument out of range");
        goto done;
    }
    /* Every check below reads what only writers change, and this writer holds the write
     * lock (store.py's ``locked``), so nothing changes between a check and the stores it
     * decides. Lock-free readers do not look at classes, pages, rings or counts; the one
     * shared word they write is a reference byte (see the bit cleared below). */
    /* Index.store: over budget, Python evicts first */
    if (get_u64(buf + group + self->g_bytes) + (uint64_t)nbytes
            > get_u64(buf + group + self->g_budget))
        goto declined;
    /* Slabs.class_for */
    uint64_t need = (uint64_t)(self->item_header_bytes + nbytes);
    need = (need + self->chunk_align - 1) / self->chunk_align * self->chunk_align;
    uint32_t count = get_u32(buf + self->h_class_count);
    Py_ssize_t class_id = -1;
    uint64_t best = 0;
    for (Py_ssize_t c = 0; c < count && c < self->max_classes; c++) {
        uint64_t chunk_size = get_u32(buf + self->classes_off + c * self->class_record_bytes
                                      + self->c_chunk_size);
        if (chunk_size >= need && (class_id < 0 || chunk_size < best)) {
            class_id = c;
            best = chunk_size;
        }
    }
    if (class_id < 0 || count > self->max_classes)
        goto declined;                          /* no class holds it: Python says so */
    Py_ssize_t class_rec = self->classes_off + class_id * self->class_record_bytes;
    int voting = best - need > best >> self->fit_shift;
    uint32_t candidate = get_u32(buf + class_rec + self->c_vote_size);
    uint32_t lead = get_u32(buf + class_rec + self->c_vote_lead);
    if (voting) {                               /* Slabs._vote, all but the new class */
        if (candidate == need)
            lead += 1;
        else if (lead == 0) {
            candidate = (uint32_t)need;
            lead = 1;
        }
        else
            lead -= 1;
        if (lead == 0 && candidate == need) /* the lead wrapped: Python's pack fails */
            goto declined;
        if (lead >= self->votes_for_new_class && count < self->max_classes
                && get_u32(buf + self->h_free_pages) > 0)
            goto declined;                      /* a new class: Python makes it */
    }
    /* Slabs.alloc, when the first page on the class's partial list has a chunk */
    uint32_t head = get_u32(buf + class_rec + self->c_partial);
    if (head == 0 || head > self->npages)
        goto declined;                          /* a new page first: Python's _take_free_page */
    Py_ssize_t page = head - 1;
    uint8_t *page_rec = buf + self->pagemeta_off + page * self->page_record_bytes;
    uint32_t cls = get_u32(page_rec + self->p_class), carve = get_u32(page_rec + self->p_carve);
    uint32_t used = get_u32(page_rec + self->p_used);
    uint32_t free_head = get_u32(page_rec + self->p_free_head);
    uint32_t chunk = get_u32(page_rec + self->p_chunk_size);
    uint32_t slots = get_u32(page_rec + self->p_slots);
    if (!free_head && carve >= slots)
        goto declined;                          /* full: Python takes it off the list */
    Py_ssize_t base = self->pages_off + page * self->page_size;
    Py_ssize_t offset = base + (Py_ssize_t)((free_head ? free_head - 1 : carve)) * chunk;
    Py_ssize_t bit = (offset - self->pages_off) / self->refbit_granule;
    Py_ssize_t byte = self->refbits_off + (bit >> 3);
    if (offset + self->item_header_bytes + nbytes > size || byte >= size)
        goto declined;                          /* torn records: Python's checks decide */
    uint64_t ref = (uint64_t)offset >> 3;
    if (ref > 0xFFFFFFFFULL)
        goto declined;
    Py_ssize_t page_at = page_rec - buf;
    if (voting) {                               /* the vote: a hint, not journaled */
        put_u32(buf + class_rec + self->c_vote_size, candidate);
        put_u32(buf + class_rec + self->c_vote_lead, lead);
    }
    if (free_head) {
        uint64_t link = get_u32(buf + offset + self->o_chain);
        if (journal_call(self, buf, size, &pos, "w64", page_at + self->p_used_free, 8,
                         (uint64_t)used + 1 + (link << 32), 0, step) < 0)
            goto done;
    }
    else if (journal_call(self, buf, size, &pos, "w64x2", page_at + self->p_class_carve, 16,
                          (uint64_t)cls + (((uint64_t)carve + 1) << 32), (uint64_t)used + 1,
                          step) < 0)
        goto done;
    /* The chunk is not reachable yet: only word 0 (free-list link and state) is journaled. */
    uint64_t high = state_frac | (uint64_t)klen << 8 * (self->o_klen - self->o_state)
                    | (uint64_t)gid << 8 * (self->o_gid - self->o_state);
    uint64_t word0 = get_u32(buf + bucket_off) | high << 8 * (self->o_state - self->o_word0);
    if (journal_call(self, buf, size, &pos, "w64", offset + self->o_word0, 8, word0, 0,
                     step) < 0)
        goto done;
    uint8_t *start = buf + offset + self->item_header_bytes;
    memcpy(start, key.buf, klen);
    memcpy(start + klen, value.buf, vlen);
    /* A reader setting a neighbour's bit in the same byte meanwhile may lose it, as in
     * Python's ``&=``: a lost reference costs that item its second chance, nothing else. */
    buf[byte] &= (uint8_t)~(1 << (bit & 7));
    /* into the ring, behind the hand */
    uint32_t hand = get_u32(buf + group + self->g_hand);
    if (hand) {
        Py_ssize_t hand_at = (Py_ssize_t)hand << 3;
        if (hand_at + self->item_header_bytes > size) {
            PyErr_Format(PyExc_ValueError, "insert: ring item %zd out of bounds", hand_at);
            goto done;
        }
        uint32_t newest = get_u32(buf + hand_at + self->o_prev);
        put_u32(buf + offset + self->o_expiry, (uint32_t)seconds);
        put_u32(buf + offset + self->o_vlen, (uint32_t)vlen);
        put_u32(buf + offset + self->o_prev, newest);
        put_u32(buf + offset + self->o_next, hand);
        if (journal_call(self, buf, size, &pos, "w32", ((Py_ssize_t)newest << 3) + self->o_next,
                         4, ref, 0, step) < 0
                || journal_call(self, buf, size, &pos, "w32", hand_at + self->o_prev, 4, ref, 0,
                                step) < 0)
            goto done;
    }
    else {
        put_u32(buf + offset + self->o_expiry, (uint32_t)seconds);
        put_u32(buf + offset + self->o_vlen, (uint32_t)vlen);
        put_u32(buf + offset + self->o_prev, (uint32_t)ref);
        put_u32(buf + offset + self->o_next, (uint32_t)ref);
        if (journal_call(self, buf, size, &pos, "w32", group + self->g_hand, 4, ref, 0, step) < 0)
            goto done;
    }
    /* Published. The item's stripe is odd since Index.store began (readers retry), and a
     * reader that walks the chain anyway sees the bucket change only after the item is
     * whole: the barriers in journal_call keep the stores in this order, x86-64 keeps them
     * in order for other cores. */
    if (journal_call(self, buf, size, &pos, "w32", bucket_off, 4, ref, 0, step) < 0)
        goto done;
    uint64_t held = get_u64(buf + group + self->g_bytes);
    uint64_t items = get_u64(buf + group + self->g_items);
    if (journal_call(self, buf, size, &pos, "w64x2", group + self->g_bytes, 16,
                     held + (uint64_t)nbytes, items + 1, step) < 0)
        goto done;
    Py_ssize_t sets = group + self->g_sets;
    put_u64(buf + sets, get_u64(buf + sets) + 1);
    result = PyLong_FromSsize_t(pos);
    goto done;
declined:
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&arena);
    PyBuffer_Release(&value);
    PyBuffer_Release(&key);
    return result;
}

static Py_ssize_t
constant(PyObject *constants, const char *name)
{
    PyObject *value = PyDict_GetItemString(constants, name);     /* borrowed */
    if (value == NULL) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_KeyError, "Writer: constant %s missing", name);
        return -1;
    }
    return PyLong_AsSsize_t(value);
}

static PyObject *
writer_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *buf, *constants, *journal_full;
    if (!PyArg_ParseTuple(args, "OO!O:Writer", &buf, &PyDict_Type, &constants, &journal_full))
        return NULL;
    Writer *self = (Writer *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->buf = Py_NewRef(buf);
    self->journal_full = Py_NewRef(journal_full);
    struct { const char *name; Py_ssize_t *slot; } fields[] = {
        {"log_start", &self->log_start}, {"log_end", &self->log_end},
        {"entry_bytes", &self->entry_bytes}, {"e_word", &self->e_word},
        {"e_old", &self->e_old}, {"e_step", &self->e_step}, {"tx_active", &self->tx_active},
        {"tx_seq", &self->tx_seq}, {"item_header_bytes", &self->item_header_bytes},
        {"o_word0", &self->o_word0},
        {"o_klen", &self->o_klen}, {"o_gid", &self->o_gid}, {"o_expiry", &self->o_expiry},
        {"groups_off", &self->groups_off}, {"group_record_bytes", &self->group_record_bytes},
        {"g_sets", &self->g_sets}, {"refbits_off", &self->refbits_off},
        {"pages_off", &self->pages_off}, {"refbit_granule", &self->refbit_granule},
        {"classes_off", &self->classes_off}, {"class_record_bytes", &self->class_record_bytes},
        {"c_partial", &self->c_partial}, {"max_classes", &self->max_classes},
        {"c_chunk_size", &self->c_chunk_size}, {"c_vote_size", &self->c_vote_size},
        {"c_vote_lead", &self->c_vote_lead}, {"h_class_count", &self->h_class_count},
        {"h_free_pages", &self->h_free_pages}, {"chunk_align", &self->chunk_align},
        {"fit_shift", &self->fit_shift}, {"votes_for_new_class", &self->votes_for_new_class},
        {"g_budget", &self->g_budget},
        {"pagemeta_off", &self->pagemeta_off}, {"page_record_bytes", &self->page_record_bytes},
        {"page_size", &self->page_size}, {"npages", &self->npages},
        {"p_class", &self->p_class}, {"p_carve", &self->p_carve}, {"p_used", &self->p_used},
        {"p_free_head", &self->p_free_head}, {"p_chunk_size", &self->p_chunk_size},
        {"p_slots", &self->p_slots}, {"p_class_carve", &self->p_class_carve},
        {"p_used_free", &self->p_used_free}, {"o_chain", &self->o_chain},
        {"o_state", &self->o_state}, {"o_vlen", &self->o_vlen}, {"o_prev", &self->o_prev},
        {"o_next", &self->o_next}, {"g_hand", &self->g_hand}, {"g_bytes", &self->g_bytes},
        {"g_items", &self->g_items}, {"max_groups", &self->max_groups},
    };
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
        *fields[i].slot = constant(constants, fields[i].name);
        if (*fields[i].slot < 0) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "Writer: constant %s negative", fields[i].name);
            Py_DECREF(self);
            return NULL;
        }
    }
    Py_ssize_t state_writing = constant(constants, "state_writing");
    PyObject *mask = PyDict_GetItemString(constants, "keep_mask");
    if (state_writing < 0 || mask == NULL || self->refbit_granule == 0
            || self->e_word + 8 > self->entry_bytes || self->e_old + 8 > self->entry_bytes
            || self->e_step + 8 > self->entry_bytes || self->o_word0 + 8 > self->item_header_bytes
            /* insert: word 0 holds state, key length and group id above the chain, one u64
             * the w64x2s write two adjacent words, and every record field lies inside it */
            || self->o_state < self->o_word0 || self->o_klen <= self->o_state
            || self->o_gid <= self->o_klen || self->o_gid >= self->o_word0 + 8
            || self->p_used_free != self->p_used || self->p_free_head != self->p_used + 4
            || self->p_class_carve != self->p_class || self->p_carve != self->p_class + 4
            || self->g_items != self->g_bytes + 8 || self->page_size == 0
            || self->chunk_align == 0 || self->fit_shift > 31
            || self->c_chunk_size + 4 > self->class_record_bytes
            || self->c_vote_size + 4 > self->class_record_bytes
            || self->c_vote_lead + 4 > self->class_record_bytes
            || self->g_budget + 8 > self->group_record_bytes
            || self->c_partial + 4 > self->class_record_bytes
            || self->p_slots + 4 > self->page_record_bytes
            || self->p_chunk_size + 4 > self->page_record_bytes
            || self->p_used_free + 8 > self->page_record_bytes
            || self->p_class_carve + 16 > self->page_record_bytes
            || self->g_hand + 4 > self->group_record_bytes
            || self->g_bytes + 16 > self->group_record_bytes
            || self->g_sets + 8 > self->group_record_bytes
            || self->o_vlen + 4 > self->item_header_bytes
            || self->o_prev + 4 > self->item_header_bytes
            || self->o_next + 4 > self->item_header_bytes
            || self->o_expiry + 4 > self->item_header_bytes
            || self->o_chain + 4 > self->item_header_bytes) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "Writer: bad constants");
        Py_DECREF(self);
        return NULL;
    }
    self->state_writing = (uint64_t)state_writing;
    self->keep_mask = PyLong_AsUnsignedLongLongMask(mask);
    if (PyErr_Occurred()) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void
writer_dealloc(Writer *self)
{
    Py_XDECREF(self->buf);
    Py_XDECREF(self->journal_full);
    Py_XDECREF(self->pause);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef writer_methods[] = {
    {"rewrite", (PyCFunction)(void (*)(void))writer_rewrite, METH_FASTCALL,
     "rewrite(offset, value, seconds, state_and_frac, pos, step): lru_index's in-place "
     "rewrite step; returns the journal step left open"},
    {"insert", (PyCFunction)(void (*)(void))writer_insert, METH_FASTCALL,
     "insert(gid, bucket_off, key, value, seconds, state_and_frac, pos, step): lru_index's "
     "new-key insertion when no eviction, new class or new page is due; returns "
     "the journal's new pos, or None (declined: nothing written)"},
    {NULL},
};

static PyMemberDef writer_members[] = {
    {"pause", T_OBJECT, offsetof(Writer, pause), 0,
     "tests: a callable called with \"w64\" or \"checkpoint\" before each journaled store"},
    {NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmcache._native.Writer",
    .tp_doc = "Writer(buf, constants, JournalFull): lru_index.py's in-place rewrite and "
              "new-key insertion, in C",
    .tp_basicsize = sizeof(Writer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = writer_new,
    .tp_dealloc = (destructor)writer_dealloc,
    .tp_methods = writer_methods,
    .tp_members = writer_members,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "shmcache._native",
    "reader.py's lock-free read path and lru_index.py's in-place rewrite and new-key "
    "insertion, in C (optional).", -1, NULL,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    ONE = PyLong_FromLong(1);
    if (ONE == NULL || PyType_Ready(&ReaderType) < 0 || PyType_Ready(&WriterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Reader", (PyObject *)&ReaderType) < 0
            || PyModule_AddObjectRef(m, "Writer", (PyObject *)&WriterType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
