// Names the status codes the launchers in fedhpc_cuda.h return (cudaError_t values).
#include <cuda_runtime.h>

#include "fedhpc_cuda.h"

extern "C" const char* fedhpc_cuda_error_string(int status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}
