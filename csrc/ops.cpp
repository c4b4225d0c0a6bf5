// The compiled CPU extension, imported as one Python module: sparsekern._C_avx512,
// _C_avx2 or _C_base (the same sources built per instruction set; sparsekern/_cpu_isa.py
// imports the best this CPU runs) or sparsekern._C (one SPARSEKERN_CPU_ARCH build).
// setup.py passes the module's name as SPARSEKERN_MODULE.
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
#include "module_init.h"
#include "cpu/bf16_dot_support.h"

namespace {
// sparsekern._C*.bf16_dot_supported(): whether the bf16 linear kernels can take the
// AVX512-BF16 path here (this build has it and the CPU runs it).
PyObject* bf16_dot_supported(PyObject*, PyObject*) {
  return PyBool_FromLong(sparsekern::cpu::bf16_dot_supported() ? 1 : 0);
}
PyMethodDef methods[] = {
    {"bf16_dot_supported", bf16_dot_supported, METH_NOARGS,
     "Whether the bf16 CPU linear kernels can use AVX512-BF16 (vdpbf16ps) on this CPU."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

SPARSEKERN_DEFINE_MODULE_WITH(methods)
