// The Python module entry point of a compiled sparsekern extension. Its name comes
// from setup.py as SPARSEKERN_MODULE (e.g. _C_avx2, _C_cuda); importing it runs the
// files' TORCH_LIBRARY(_IMPL) registrations. The ops are torch.library ops; the module's
// own functions (SPARSEKERN_DEFINE_MODULE_WITH) only report what the build can do.
#pragma once

#include <Python.h>

#ifndef SPARSEKERN_MODULE
#define SPARSEKERN_MODULE _C
#endif

#define SPARSEKERN_CAT2(a, b) a##b
#define SPARSEKERN_CAT(a, b) SPARSEKERN_CAT2(a, b)
#define SPARSEKERN_STR2(a) #a
#define SPARSEKERN_STR(a) SPARSEKERN_STR2(a)

#define SPARSEKERN_DEFINE_MODULE_WITH(methods)                                          \
  extern "C" PyObject* SPARSEKERN_CAT(PyInit_, SPARSEKERN_MODULE)(void) {               \
    static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT,                      \
                                            SPARSEKERN_STR(SPARSEKERN_MODULE), nullptr, \
                                            -1, methods};                               \
    return PyModule_Create(&module_def);                                                \
  }

#define SPARSEKERN_DEFINE_MODULE() SPARSEKERN_DEFINE_MODULE_WITH(nullptr)
