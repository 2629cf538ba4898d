/*
 * Repair symbols of the imaging erasure code (bootherd/imaging/fec.py) in C: the server
 * encodes a few per stripe of every chunk it sends, and numpy's gather costs ~1 ms per
 * symbol.  Same field (GF(2^8), 0x11d), same Cauchy coefficients 1 / (j ^ (R_MAX + t)),
 * same layout (block b of the chunk is in stripe b % stripes at index b / stripes); the
 * Python code is the reference and the fallback, and a test compares the two.
 *
 * encode(stored: bytes, stripes: int, stripe: int, repairs: list[int]) -> list[bytes]
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "imaging/client/gf256.h"

#define BLOCK GF_BLOCK
#define R_MAX GF_R_MAX
#define K_MAX GF_K_MAX

static PyObject *encode(PyObject *self, PyObject *args) {
    Py_buffer buf;
    int stripes, stripe;
    PyObject *reps;
    if (!PyArg_ParseTuple(args, "y*iiO!", &buf, &stripes, &stripe, &PyList_Type, &reps))
        return NULL;
    Py_ssize_t len = buf.len, blocks = len ? (len + BLOCK - 1) / BLOCK : 1;
    Py_ssize_t m = PyList_GET_SIZE(reps);
    if (stripes < 1 || stripe < 0 || stripe >= stripes || m > R_MAX) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "bad stripe or too many repairs");
        return NULL;
    }
    Py_ssize_t k = (blocks - stripe + stripes - 1) / stripes;
    if (k > K_MAX) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "stripe longer than K_MAX");
        return NULL;
    }
    int js[R_MAX];
    for (Py_ssize_t i = 0; i < m; i++) {
        long j = PyLong_AsLong(PyList_GET_ITEM(reps, i));
        if (j < 0 || j >= R_MAX) {
            PyBuffer_Release(&buf);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "repair index out of range");
            return NULL;
        }
        js[i] = (int)j;
    }
    PyObject *out = PyList_New(m);
    if (!out) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    uint8_t (*acc)[BLOCK] = calloc((size_t)(m ? m : 1), BLOCK);
    if (!acc) {
        Py_DECREF(out);
        PyBuffer_Release(&buf);
        return PyErr_NoMemory();
    }
    const uint8_t *data = buf.buf;
    uint8_t pad[BLOCK];
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t t = 0; t < k; t++) {
        Py_ssize_t b = t * stripes + stripe, off = b * BLOCK;
        const uint8_t *src = data + off;
        if (off + BLOCK > len) { /* the last block: zero-padded */
            memset(pad, 0, BLOCK);
            memcpy(pad, data + off, (size_t)(len - off));
            src = pad;
        }
        for (Py_ssize_t i = 0; i < m; i++)
            gf_addmul(acc[i], src, gf_coef(js[i], (int)t), BLOCK);
    }
    Py_END_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < m; i++)
        PyList_SET_ITEM(out, i, PyBytes_FromStringAndSize((const char *)acc[i], BLOCK));
    free(acc);
    PyBuffer_Release(&buf);
    return out;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS, "repair symbols of one stripe of a chunk"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_imgfec", NULL, -1, methods};

PyMODINIT_FUNC PyInit__imgfec(void) {
    gf_init();
    return PyModule_Create(&module);
}
