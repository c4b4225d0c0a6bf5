// The compiled extension, imported as the Python module sparsekern._C.
//
// Operator schemas live in Python (sparsekern/ops/library.py, one schema per
// op), so the ops exist, trace under torch.compile and dispatch to the
// reference path even when this extension is not built. Each backend file
// ends with its TORCH_LIBRARY_IMPL(sparsekern, CPU|CUDA, m); importing the
// module runs those registrations.
//
// Arguments shared by the ops describe a sparse weight W of shape [R*b, C*b]
// (b = 1 for CSR):
//   values      [nnz] (CSR) or [nnz, b, b] (BSR), the only trainable tensor
//   row_offsets int32 [R+1], col_indices int32 [nnz]: W in CSR/BSR order
//   t_offsets   int32 [C+1], t_indices int32 [nnz], t_perm int32 [nnz]:
//               W^T; entry j of W^T is values[t_perm[j]] (never a copy)
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
