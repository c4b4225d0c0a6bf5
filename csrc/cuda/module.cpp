// The CUDA extension's Python module, sparsekern._C_cuda: importing it runs the
// TORCH_LIBRARY(sparsekern_cuda) registrations of sparse_cuda.cu.
#include "../module_init.h"

SPARSEKERN_DEFINE_MODULE()
